"""Propagation rules of :mod:`pipeline.sparse.detect`: one small function per ATen op family.

Every tensor of a traced function carries a :class:`Dep`: its dependency
pattern on the flat input (a boolean CSR matrix, rows = the tensor's flat
elements in row-major order, columns = ``x.reshape(-1)``; ``None`` when it has
none) and whether its *value* depends on ``x`` at all (``tainted``: ``x > 0``
has no derivative but is not a constant, so it may not be read as data in
global mode). A rule gets an :class:`Op` (the real argument values, their
``Dep``s and the real output) and returns the output's ``Dep`` (a list for
multi-output ops). All rules work on whole index arrays (numpy/scipy), never
per element in Python.

NOTE: [index maps]
Movement ops (views, slicing, padding, gathers, concatenation, writes into
slices) are handled by one rule: the same ATen op is applied to a tensor of
element *indices* (``int64`` arange in the input's shape) and the result says
which input element each output element is (the maps count from 1, so the 0
that padding, masking or ``tril`` write means "no element"). Its rows are then
taken from the input's pattern. This is exact and needs no per-op shape logic,
so any new view op costs one table entry.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.core.errors import SparsityError as SparsityError
from pipeline.sparse.randomness import RANDOM as RANDOM
from pipeline.sparse.randomness import draws_random as draws_random
from pipeline.sparse.randomness import is_random as is_random
from pipeline.sparse.randomness import op_name as op_name

aten = torch.ops.aten


class SparsityWarning(UserWarning):
    """An op was handled conservatively (every output depends on every input)."""


class Dense(Exception):  # noqa: N818 - a signal, not an error
    """Raised inside the propagation when a pattern exceeds the cap."""


@dataclass(frozen=True)
class Dep:
    """Dependency of one tensor on ``x``: its pattern (CSR or None) and whether its value does."""

    pattern: sp.csr_matrix | None
    tainted: bool


CONST = Dep(None, False)

# The context of the propagation under way in this thread: take_rows and
# _repeat_row check the cap *before* allocating (a row of x.sum() broadcast to
# 1e6 rows would be 1e12 entries). Set by pipeline.sparse.detect for the duration
# of one detection.
_ACTIVE = threading.local()


@contextlib.contextmanager
def active(ctx: Context) -> Iterator[None]:
    """Make ``ctx`` the cap that row takes check in this thread."""
    stack = _ACTIVE.__dict__.setdefault("stack", [])
    stack.append(ctx)
    try:
        yield
    finally:
        stack.pop()


def _precheck_size(total: float, rows: int) -> None:
    stack = getattr(_ACTIVE, "stack", None)
    if stack:
        ctx = stack[-1]
        if total > ctx.cap(rows):
            raise Dense(f"a pattern of {total:,.0f} nonzeros over {rows:,} x {ctx.n:,} "
                        f"would exceed the cap ({ctx.cap(rows):,.0f})")


class Context:
    """What the rules share: sizes, mode, the cap and the warnings so far."""

    def __init__(self, n: int, m: int, mode: str, max_density: float | None,
                 max_bytes: int | None) -> None:
        self.n, self.m, self.mode = n, m, mode
        self.max_density, self.max_bytes = max_density, max_bytes
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        self._maps: dict[tuple, torch.Tensor] = {}

    def index_map(self, t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """:func:`index_map`, the last few kept: a padded field sliced by a stencil asks for
        the same two maps eight times. Movement ops only read them (views, copies)."""
        key = (tuple(t.shape), offset)
        hit = self._maps.get(key)
        if hit is None:
            hit = index_map(t, offset)
            if len(self._maps) >= 4:
                self._maps.pop(next(iter(self._maps)))
            self._maps[key] = hit
        return hit

    @property
    def local(self) -> bool:
        return self.mode == "local"

    def cap(self, numel: int) -> float:
        """Most stored entries a tensor of ``numel`` elements may have before giving up."""
        cap = float("inf")
        if self.max_bytes is not None:
            cap = self.max_bytes / 8  # int64 column index per entry, as scipy may store
        if self.max_density is not None:
            # NOTE: a floor of 2 (m + n) lets a few dense rows through (a
            # scalar sum of all of x, the arrowhead row of a reverse-mode
            # colouring); what makes colouring pointless is a whole tensor
            # that is dense, e.g. the hidden layer of an MLP.
            floor = 2.0 * (self.m + self.n)
            cap = min(cap, max(self.max_density * numel * self.n, floor))
        return cap

    def check(self, pattern: sp.csr_matrix | None, what: str) -> sp.csr_matrix | None:
        if pattern is not None and pattern.nnz > self.cap(pattern.shape[0]):
            raise Dense(f"{what}: {pattern.nnz:,} nonzeros over {pattern.shape[0]:,} x "
                        f"{self.n:,} exceed the cap ({self.cap(pattern.shape[0]):,.0f})")
        return pattern

    def precheck(self, upper: float, lower: float, flops: float, numel: int, what: str) -> None:
        """Give up before building a product whose size or cost is already known to be too big."""
        cap = self.cap(numel)
        if lower > cap:
            raise Dense(f"{what}: at least {lower:,.0f} nonzeros over {numel:,} x {self.n:,} "
                        f"exceed the cap ({cap:,.0f})")
        if upper > cap and flops > 4 * cap:
            raise Dense(f"{what}: up to {upper:,.0f} nonzeros ({flops:,.0f} products to "
                        f"find them) exceed the cap ({cap:,.0f}); treated as dense")

    def warn(self, op: str, message: str) -> None:
        if op not in self._warned:
            self._warned.add(op)
            self.warnings.append(message)
            warnings.warn(message, SparsityWarning, stacklevel=4)


@dataclass
class Op:
    """One call: the op, real argument values, their deps, the real output."""

    func: Any
    args: tuple
    kwargs: dict
    deps: tuple
    kwdeps: dict
    out: Any
    ctx: Context

    def named(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Arguments and deps by schema name (defaults filled in)."""
        values: dict[str, Any] = {}
        deps: dict[str, Any] = {}
        for i, a in enumerate(self.func._schema.arguments):
            if i < len(self.args):
                values[a.name], deps[a.name] = self.args[i], self.deps[i]
            elif a.name in self.kwargs:
                values[a.name], deps[a.name] = self.kwargs[a.name], self.kwdeps.get(a.name)
            else:
                values[a.name] = a.default_value if a.has_default_value() else None
                deps[a.name] = None
        return values, deps


# ---------------------------------------------------------------------------
# Pattern helpers
# ---------------------------------------------------------------------------


def identity_pattern(n: int) -> sp.csr_matrix:
    """x's own pattern: ``sp.identity(n, dtype=bool, format="csr")``, built from aranges
    (scipy builds it through a diagonal: 8 ms at n = 10^6), with its row columns kept for
    :func:`take_rows`."""
    idx = index_dtype(n)
    eye = sp.csr_matrix((np.ones(n, dtype=bool), np.arange(n, dtype=idx),
                         np.arange(n + 1, dtype=idx)), shape=(n, n))
    col = np.arange(n + 1, dtype=idx)
    col[-1] = -1
    eye._jacpipe_at_most_one = True
    eye._jacpipe_row_columns = col
    return eye


def empty(rows: int, n: int) -> sp.csr_matrix:
    return sp.csr_matrix((rows, n), dtype=bool)


def index_dtype(*sizes: int) -> type:
    """The index dtype scipy.sparse picks for a matrix of these sizes (rows, columns,
    stored entries): int32 while they all fit, else int64.

    NOTE: [index dtype]
    ``sp.csr_matrix((data, indices, indptr))`` given int64 arrays scans them
    (min and max) and converts them to int32 when the values fit: two passes
    and two copies of every index array. Arrays built in this dtype are kept
    as they are, and the matrix is the same.
    """
    return np.int32 if max(sizes, default=0) <= np.iinfo(np.int32).max else np.int64


def take_rows(p: sp.csr_matrix | None, rows: np.ndarray, n: int) -> sp.csr_matrix | None:
    """Rows ``p[rows]`` as a new CSR (``-1``: an empty row); None stays None."""
    if p is None:
        return None
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size == p.shape[0] and rows.size and rows[0] == 0 and (
        np.array_equal(rows, np.arange(rows.size))
    ):
        return p
    if _at_most_one_per_row(p):
        # At most one entry per row (x itself, its elementwise functions,
        # their slices and paddings): each row's column, -1 for none, with a
        # -1 appended that a row -1 reads; 6x faster than the general path.
        # The arrays are built in the index dtype scipy would pick (int32
        # while n and the row count fit), so its constructor neither scans
        # nor converts them (NOTE: [index dtype]).
        idx = index_dtype(rows.size, n)
        col = np.empty(rows.size + 1, dtype=idx)
        # mode "wrap": a row -1 reads the last -1 ("raise" buffers the output: 3x slower)
        np.take(_row_columns(p).astype(idx, copy=False), rows, out=col[:-1], mode="wrap")
        col[-1] = -1
        has = col[:-1] >= 0
        out_ptr = np.zeros(rows.size + 1, dtype=idx)
        np.cumsum(has, dtype=idx, out=out_ptr[1:])
        _precheck_size(float(out_ptr[-1]), rows.size)
        cols = col[:-1][has]
        out = sp.csr_matrix((np.ones(cols.size, dtype=bool), cols, out_ptr),
                            shape=(rows.size, n))
        out._jacpipe_at_most_one = True
        out._jacpipe_row_columns = col
        return out
    valid = rows >= 0
    r = np.where(valid, rows, 0)
    indptr = p.indptr.astype(np.int64, copy=False)
    starts = indptr[r]
    lens = np.where(valid, indptr[r + 1] - starts, 0)
    out_ptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lens, out=out_ptr[1:])
    total = int(out_ptr[-1])
    _precheck_size(float(total), rows.size)
    src = np.repeat(starts - out_ptr[:-1], lens) + np.arange(total, dtype=np.int64)
    return sp.csr_matrix((np.ones(total, dtype=bool), p.indices[src], out_ptr),
                         shape=(rows.size, n))


def _row_columns(p: sp.csr_matrix) -> np.ndarray:
    """Each row's column (-1: an empty row) and a last -1, for a pattern with at most one
    entry per row (remembered on the matrix, as :func:`_at_most_one_per_row`)."""
    col = getattr(p, "_jacpipe_row_columns", None)
    if col is None:
        col = np.full(p.shape[0] + 1, -1, dtype=index_dtype(*p.shape))
        col[:-1][np.diff(p.indptr) > 0] = p.indices[: p.nnz]
        p._jacpipe_row_columns = col
    return col


def _at_most_one_per_row(p: sp.csr_matrix) -> bool:
    """Whether no row of ``p`` has two entries (remembered on the matrix: a padded field's
    pattern is sliced four times by a 5-point stencil)."""
    known = getattr(p, "_jacpipe_at_most_one", None)
    if known is None:
        known = p.nnz <= p.shape[0] and int(np.diff(p.indptr).max(initial=0)) <= 1
        p._jacpipe_at_most_one = known
    return known


def union(patterns: list[sp.csr_matrix | None]) -> sp.csr_matrix | None:
    """Elementwise OR of same-shape patterns (None: empty); the same object is counted once."""
    seen: dict[int, sp.csr_matrix] = {}
    for p in patterns:
        if p is not None and p.nnz:
            seen.setdefault(id(p), p)
    ps = list(seen.values())
    if not ps:
        return next((p for p in patterns if p is not None), None)
    out = ps[0]
    for p in ps[1:]:
        if _holds(out, p):
            continue
        if _holds(p, out):
            out = p
            continue
        out = _remember_parts(out + p, out, p)  # bool + bool is OR in scipy.sparse
    return out


_MAX_PARTS = 256  # NOTE: [union parts]


def _holds(union_: sp.csr_matrix, p: sp.csr_matrix) -> bool:
    """Whether ``p`` (this very object) went into the union ``union_``, so ``p`` is inside it.

    NOTE: [union parts]
    A union remembers the patterns it was made of (weakly: a dead part's
    reference no longer resolves, so a new pattern given its id is not taken
    for it). ``u - dt * f(u)`` then costs no second union with u's pattern
    when f(u)'s already holds it (heat, reaction-diffusion residuals: one
    ``csr_plus_csr`` of 5 x 10^6 entries less at N = 1000). Patterns are never
    changed in place to hold more entries, so a part stays inside.
    """
    ref = getattr(union_, "_jacpipe_parts", {}).get(id(p))
    return ref is not None and ref() is p


def _remember_parts(out: sp.csr_matrix, a: sp.csr_matrix, b: sp.csr_matrix) -> sp.csr_matrix:
    parts = {**getattr(a, "_jacpipe_parts", {}), **getattr(b, "_jacpipe_parts", {})}
    if len(parts) > _MAX_PARTS:  # a long chain: its direct parts only (the list stays short)
        parts = {}
    parts[id(a)], parts[id(b)] = weakref.ref(a), weakref.ref(b)
    out._jacpipe_parts = parts
    return out


def _distinct_columns(indices: np.ndarray) -> np.ndarray:
    """Sorted distinct column indices, by a presence table (np.unique hashed 2e6 indices
    in 1.9 s; this takes milliseconds)."""
    if indices.size == 0:
        return np.zeros(0, dtype=np.int64)
    present = np.zeros(int(indices.max()) + 1, dtype=bool)
    present[indices] = True
    return np.flatnonzero(present)


def from_pairs(out_rows: np.ndarray, in_rows: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """The boolean linear map sending input row ``in_rows[k]`` into output row ``out_rows[k]``."""
    keep = (in_rows >= 0) & (out_rows >= 0)
    r, c = out_rows[keep], in_rows[keep]
    return sp.csr_matrix((np.ones(r.size, dtype=bool), (r, c)), shape=shape)


def apply_map(ctx: Context, m: sp.csr_matrix, p: sp.csr_matrix | None, what: str
              ) -> sp.csr_matrix | None:
    """``m @ p`` (boolean), after an upper-bound check of its size against the cap."""
    if p is None:
        return None
    rn = np.diff(p.indptr).astype(np.float64)
    bound = m.astype(np.float64) @ rn
    upper = float(np.minimum(bound, ctx.n).sum())
    exact = p.nnz == 0 or np.bincount(p.indices, minlength=ctx.n).max() <= 1
    ctx.precheck(upper, upper if exact else 0.0, float(bound.sum()), m.shape[0], what)
    out = (m @ p).tocsr()
    out.sort_indices()
    return ctx.check(out, what)


def index_map(t: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``int64`` element indices plus one, in the shape of ``t`` (see NOTE: [index maps])."""
    return torch.arange(offset + 1, offset + 1 + t.numel(), dtype=torch.int64).reshape(t.shape)


def _rows(result: torch.Tensor) -> np.ndarray:
    """A 1-based index map back to 0-based rows (-1: no element)."""
    return (result - 1).reshape(-1).numpy()  # one new array, also from a strided view


def broadcast(p: sp.csr_matrix | None, shape: tuple, out_shape: tuple, n: int
              ) -> sp.csr_matrix | None:
    """A pattern of a tensor of ``shape`` broadcast to ``out_shape``."""
    if p is None or tuple(shape) == tuple(out_shape):
        return p
    numel = int(np.prod(shape, dtype=np.int64))
    idx = torch.arange(numel, dtype=torch.int64).reshape(shape).expand(out_shape)
    return take_rows(p, idx.reshape(-1).numpy(), n)


def _shape(v: Any) -> tuple:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _floating(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def _tainted(deps: Any) -> bool:
    if isinstance(deps, Dep):
        return deps.tainted
    if isinstance(deps, list | tuple):
        return any(_tainted(d) for d in deps)
    return False


def _leaves(deps: Any) -> list[Dep]:
    if isinstance(deps, Dep):
        return [deps]
    if isinstance(deps, list | tuple):
        return [d for x in deps for d in _leaves(x)]
    return []


def _support(t: torch.Tensor, dep: Dep, ctx: Context) -> torch.Tensor:
    """Where a matmul/conv operand may be nonzero: its values if constant (or local), else all."""
    if dep.tainted and not ctx.local:
        return torch.ones(t.shape, dtype=torch.bool)
    return t != 0


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------


def constant(op: Op) -> Dep:
    """Creation ops (``full``, ``zeros_like``, ``arange``...): no dependency on x."""
    return CONST


def no_derivative(op: Op) -> Any:
    """Zero-derivative ops (sign, floor, comparisons, argmax): no pattern, value still tainted."""
    dep = Dep(None, _tainted(op.deps) or _tainted(list(op.kwdeps.values())))
    if isinstance(op.out, tuple | list):
        return [dep for _ in op.out]
    return dep


def pointwise(op: Op) -> Any:
    """Elementwise ops with broadcasting: the union of the broadcast inputs' patterns
    (for each output of a multi-output op such as ``frexp``; none for integer outputs)."""
    if isinstance(op.out, tuple | list):
        first = next(o for o in op.out if isinstance(o, torch.Tensor))
        dep = pointwise(Op(op.func, op.args, op.kwargs, op.deps, op.kwdeps, first, op.ctx))
        return [dep if _floating(o) else Dep(None, dep.tainted) for o in op.out]
    n, shape = op.ctx.n, _shape(op.out)
    parts = []
    pairs = list(zip(op.args, op.deps, strict=False))
    pairs += [(op.kwargs[k], d) for k, d in op.kwdeps.items()]
    for value, dep in pairs:
        if isinstance(dep, Dep) and dep.pattern is not None:
            parts.append(broadcast(dep.pattern, _shape(value), shape, n))
    tainted = _tainted(op.deps) or _tainted(list(op.kwdeps.values()))
    return Dep(op.ctx.check(union(parts), str(op.func)), tainted)


def multiply(op: Op) -> Dep:
    """``a * b``: like :func:`pointwise`, but where one factor is a constant, its zeros
    (a boundary mask, a zero scalar) remove the other factor's dependency there."""
    (a, b), (da, db) = op.args[:2], op.deps[:2]
    da = da if isinstance(da, Dep) else CONST
    db = db if isinstance(db, Dep) else CONST
    if da.tainted == db.tainted:  # both constant, or both depend on x
        return pointwise(op)
    (v, dv), (c, _) = ((a, da), (b, db)) if da.tainted else ((b, db), (a, da))
    n, shape = op.ctx.n, _shape(op.out)
    p = broadcast(dv.pattern, _shape(v), shape, n)
    if p is None:
        return Dep(None, True)
    if not isinstance(c, torch.Tensor):
        return Dep(None if c == 0 else p, True)
    keep = (c != 0).expand(shape).reshape(-1).numpy()
    if keep.all():
        return Dep(p, True)
    rows = np.where(keep, np.arange(keep.size), -1)
    return Dep(take_rows(p, rows, n), True)


def where(op: Op) -> Dep:
    """``where(c, a, b)``: both branches, or the branch taken (constant ``c``, or local mode)."""
    cond, a, b = op.args[:3]
    dc, da, db = op.deps[:3]
    n, shape = op.ctx.n, _shape(op.out)
    pa = broadcast(da.pattern, _shape(a), shape, n) if isinstance(da, Dep) else None
    pb = broadcast(db.pattern, _shape(b), shape, n) if isinstance(db, Dep) else None
    tainted = _tainted(op.deps)
    if pa is None and pb is None:
        return Dep(None, tainted)
    if dc.tainted and not op.ctx.local:  # the branch taken may change with x
        return Dep(op.ctx.check(union([pa, pb]), str(op.func)), tainted)
    return Dep(_select(cond.expand(shape), pa, pb, n), tainted)


def _select(cond: torch.Tensor, pa: Any, pb: Any, n: int) -> sp.csr_matrix:
    c = cond.reshape(-1).numpy()
    size = c.size
    pa = pa if pa is not None else empty(size, n)
    pb = pb if pb is not None else empty(size, n)
    rows = np.where(c, np.arange(size), np.arange(size) + size)
    return take_rows(sp.vstack([pa, pb], format="csr"), rows, n)


def masked_fill(op: Op) -> Dep:
    """``masked_fill(self, mask, value)`` as ``where(mask, value, self)``."""
    values, deps = op.named()
    value = values["value"]
    vdep = deps["value"] if isinstance(deps["value"], Dep) else CONST
    inner = Op(aten.where.self, (values["mask"], value if isinstance(value, torch.Tensor)
                                 else torch.zeros(()), values["self"]),
               {}, (deps["mask"], vdep, deps["self"]), {}, op.out, op.ctx)
    return where(inner)


#: Movement ops that never repeat an element (each output element is at most one input
#: element, no input element twice): a chain of two is composed (NOTE: [composed movement]).
COMPOSABLE = frozenset(("slice", "select", "narrow", "constant_pad_nd", "permute", "transpose",
                        "t", "diagonal", "roll", "flip"))


class Moved(Dep):
    """The Dep of a :data:`COMPOSABLE` op whose one user is another: built only if read.

    NOTE: [composed movement]
    A stencil slices a padded field twice per neighbour (``p[:-2, 1:-1]``:
    one slice per dim), and each slice built a pattern as large as the
    field's. The propagation (``pipeline.sparse.detect``) gives the first of
    two such ops a ``Moved``; :func:`movement` of the second applies both ops
    to the index map of the first one's source and takes that source's rows
    once: the same rows, ``take_rows(take_rows(S, a), b) = take_rows(S, a[b])``.
    Anything else that reads ``pattern`` builds it as :func:`movement` would.
    Deferred only where the first pattern passes the cap for sure (it holds
    at most its source's entries), so no ``Dense`` goes missing.
    """

    def __init__(self, op: Op, tainted: bool) -> None:
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "tainted", tainted)
        object.__setattr__(self, "_built", None)

    @property
    def pattern(self) -> sp.csr_matrix | None:  # type: ignore[override]
        if self._built is None:
            object.__setattr__(self, "_built", movement(self.op))
        return self._built.pattern


def defers(op: Op) -> bool:
    """Whether this :data:`COMPOSABLE` op's Dep may be a :class:`Moved` (its source's pattern
    is built, and no larger than the cap for the output's rows)."""
    src = op.deps[0]
    return (isinstance(src, Dep) and not isinstance(src, Moved) and src.pattern is not None
            and _floating(op.out) and src.pattern.nnz <= op.ctx.cap(op.out.numel()))


def _composed(op: Op, moved: Moved) -> Dep:
    """``op`` after the deferred op of ``moved`` (NOTE: [composed movement])."""
    inner = moved.op
    result = _map_through(op, _map_through(inner, op.ctx.index_map(inner.args[0])))
    rows = take_rows(inner.deps[0].pattern, _rows(result), op.ctx.n)
    return Dep(op.ctx.check(rows, str(op.func)), moved.tainted)


def _map_through(op: Op, index: torch.Tensor) -> torch.Tensor:
    """A single-source movement op applied to an index map in place of its source."""
    args = [index, *op.args[1:]]
    if op.func in (aten.constant_pad_nd.default,):
        args = args[:2] + [0]
    return _run_on_map(op.func, args, op.kwargs)


def movement(op: Op) -> Any:
    """Views, slicing, padding, gathers, concatenation: by index maps (NOTE: [index maps])."""
    if isinstance(op.deps[0], Moved):
        return _composed(op, op.deps[0])
    n = op.ctx.n
    is_list = isinstance(op.args[0], list | tuple)
    sources = list(op.args[0]) if is_list else [op.args[0]]
    sdeps = list(op.deps[0]) if is_list else [op.deps[0]]
    data = _leaves(list(op.deps[1:])) + _leaves(list(op.kwdeps.values()))
    tainted = any(d.tainted for d in sdeps) or any(d.tainted for d in data)
    outs = op.out if isinstance(op.out, tuple | list) else [op.out]
    if all(d.pattern is None for d in sdeps):
        res = [Dep(None, tainted) for _ in outs]
        return res if isinstance(op.out, tuple | list) else res[0]
    stacked = _stack([d.pattern for d in sdeps], [s.numel() for s in sources], n)
    if any(d.tainted for d in data) and not op.ctx.local:
        # Indices that depend on x: any output may be any source element.
        every = stacked.indices
        row = _distinct_columns(every)
        res = [Dep(op.ctx.check(_repeat_row(row, o.numel(), n), str(op.func)), True)
               for o in outs]
        return res if isinstance(op.out, tuple | list) else res[0]
    if not is_list and _keeps_order(op.func, sources[0], op.out):
        # A row-major reshape of an index map is the map itself: the pattern
        # as it is, as take_rows would return it, without building the map.
        return Dep(op.ctx.check(stacked, str(op.func)), tainted)
    maps, offset = [], 0
    for s in sources:
        maps.append(op.ctx.index_map(s, offset))
        offset += s.numel()
    new_args = list(op.args)
    new_args[0] = maps if is_list else maps[0]
    if op.func in (aten.constant_pad_nd.default,):
        new_args = new_args[:2] + [0]
    result = _run_on_map(op.func, new_args, op.kwargs)
    result = result if isinstance(result, tuple | list) else [result]
    res = [Dep(op.ctx.check(take_rows(stacked, _rows(r), n), str(op.func)), tainted)
           for r in result]
    return res if isinstance(op.out, tuple | list) else res[0]


#: Movement ops that keep the elements in row-major order (reshapes, views of the same
#: number of elements, squeezes): their index map is the identity.
_ORDER_KEEPING = frozenset(("view", "_unsafe_view", "reshape", "view_copy", "squeeze",
                            "squeeze_copy", "unsqueeze", "unsqueeze_copy"))


def _keeps_order(func: Any, source: Any, out: Any) -> bool:
    return (op_name(func) in _ORDER_KEEPING and isinstance(source, torch.Tensor)
            and isinstance(out, torch.Tensor) and out.numel() == source.numel())


def _run_on_map(func: Any, args: list, kwargs: dict) -> Any:
    try:
        return func(*args, **kwargs)
    except (RuntimeError, NotImplementedError):
        # Ops without integer kernels (reflection_pad...): float64 holds indices exactly.
        def as_float(a: Any) -> Any:
            if isinstance(a, torch.Tensor) and a.dtype == torch.int64:
                return a.double()
            if isinstance(a, list):
                return [as_float(v) for v in a]
            return a

        out = func(*[as_float(a) for a in args], **kwargs)
        if isinstance(out, tuple | list):
            return [o.round().long() for o in out]
        return out.round().long()


def _stack(patterns: list, sizes: list[int], n: int) -> sp.csr_matrix:
    if len(patterns) == 1 and patterns[0] is not None:
        return patterns[0]
    return sp.vstack([p if p is not None else empty(s, n) for p, s in zip(patterns, sizes,
                                                                         strict=True)],
                     format="csr")


def _repeat_row(cols: np.ndarray, rows: int, n: int) -> sp.csr_matrix:
    """Every one of ``rows`` rows holds the sorted columns ``cols`` (a dense block)."""
    k = cols.size
    _precheck_size(float(rows) * k, rows)
    indptr = np.arange(rows + 1, dtype=np.int64) * k
    return sp.csr_matrix((np.ones(rows * k, dtype=bool), np.tile(cols, rows), indptr),
                         shape=(rows, n))


def identity(op: Op) -> Dep:
    """Copies, dtype casts, aliases and detach (kept: a superset is safe)."""
    dep = op.deps[0]
    return Dep(dep.pattern, dep.tainted)


def copy(op: Op) -> Dep:
    """Functional ``copy(self, src)``: src broadcast to self's shape."""
    src, dep = op.args[1], op.deps[1]
    if not isinstance(dep, Dep):
        return CONST
    return Dep(broadcast(dep.pattern, _shape(src), _shape(op.out), op.ctx.n), dep.tainted)


def write(op: Op) -> Dep:
    """Non-accumulating writes (slice/select/diagonal/as_strided scatter, scatter, index_put):
    written positions take the source's pattern (by index maps)."""
    values, deps = op.named()
    names = [a.name for a in op.func._schema.arguments]
    base_name = names[0]
    src_name = next((k for k in ("src", "values", "source", "value") if k in values), None)
    if values.get("reduce"):  # scatter.reduce / scatter.value_reduce: accumulating
        if isinstance(values.get(src_name), torch.Tensor):
            return accumulate(op)
        return identity(op)
    if op.func.overloadpacket is aten.scatter and _written_twice(op, values):
        return accumulate(op)
    base, bdep = values[base_name], deps[base_name]
    src = values.get(src_name)
    sdep = deps.get(src_name) if isinstance(deps.get(src_name), Dep) else CONST
    data = [d for k, d in deps.items() if k not in (base_name, src_name)]
    tainted = _tainted([bdep, sdep] + data)
    n = op.ctx.n
    if bdep.pattern is None and sdep.pattern is None:
        return Dep(None, tainted)
    numel = base.numel()
    if any(d.tainted for d in _leaves(data)) and not op.ctx.local:
        stacked = _stack([bdep.pattern, sdep.pattern], [numel, _numel(src)], n)
        return Dep(op.ctx.check(_repeat_row(_distinct_columns(stacked.indices), numel, n),
                                str(op.func)), True)
    new = dict(values)
    new[base_name] = index_map(base)
    if isinstance(src, torch.Tensor):
        new[src_name] = index_map(src, numel)
    elif src_name is not None:
        new[src_name] = 0
    result = op.func(**new)
    stacked = _stack([bdep.pattern, sdep.pattern], [numel, _numel(src)], n)
    return Dep(op.ctx.check(take_rows(stacked, _rows(result), n), str(op.func)), tainted)


def as_strided_write(op: Op) -> Dep:
    """``as_strided_scatter``: :func:`write`, plus the base's pattern at the written positions.

    NOTE: torch's reverse mode (``as_strided_scatter_backward``, torch 2.13)
    sends self's gradient through the *written* region and zeroes the rest,
    while forward mode and finite differences do the opposite. The engine's
    rows follow autograd, so the pattern holds both: every output keeps the
    base's dependencies, and the written ones add the source's.
    """
    dep = write(op)
    base = op.deps[0] if isinstance(op.deps[0], Dep) else CONST
    pattern = union([dep.pattern, base.pattern])
    return Dep(op.ctx.check(pattern, str(op.func)) if pattern is not None else None, dep.tainted)


def _numel(v: Any) -> int:
    return v.numel() if isinstance(v, torch.Tensor) else 0


def _written_twice(op: Op, values: dict) -> bool:
    """Whether an index_put/scatter of a tensor writes some position twice (max_unpool with
    repeated indices). NOTE: reverse mode then sends that position's gradient to every
    source written there, forward mode takes the last: the pattern must hold all of them,
    as an accumulating write's does."""
    _, deps = op.named()
    names = [a.name for a in op.func._schema.arguments]
    src_name = "values" if "values" in values else "src"
    src = values.get(src_name)
    index = [d for k, d in deps.items() if k not in (names[0], src_name)]
    if not isinstance(src, torch.Tensor) or src.numel() < 2 or (
            _tainted(index) and not op.ctx.local):
        return False  # one source, or indices from x (the rules' dense case)
    mb = index_map(values[names[0]])
    if op.func.overloadpacket is aten.index_put:
        targets = aten.index.Tensor(mb, values["indices"])
    else:
        targets = mb.gather(values["dim"], values["index"])
    flat = targets.reshape(-1)
    return bool(flat.numel() > 1 and torch.unique(flat).numel() < flat.numel())


def accumulate(op: Op) -> Dep:
    """Accumulating writes (index_put accumulate, scatter_add/reduce, index_add): base ∪ sources."""
    values, deps = op.named()
    if op.func is aten.index_put.default and not values.get("accumulate") and not (
            _written_twice(op, values)):
        return write(op)
    names = [a.name for a in op.func._schema.arguments]
    base_name = names[0]
    src_name = next(k for k in ("src", "values", "source") if k in values)
    base, src = values[base_name], values[src_name]
    bdep = deps[base_name]
    sdep = deps[src_name] if isinstance(deps[src_name], Dep) else CONST
    data = [d for k, d in deps.items() if k not in (base_name, src_name)]
    tainted = _tainted([bdep, sdep] + data)
    n, numel = op.ctx.n, base.numel()
    if sdep.pattern is None:
        return Dep(bdep.pattern, tainted)
    if any(d.tainted for d in _leaves(data)) and not op.ctx.local:
        row = _distinct_columns(sdep.pattern.indices)
        return Dep(op.ctx.check(union([bdep.pattern, _repeat_row(row, numel, n)]),
                                str(op.func)), True)
    mb, ms = index_map(base), index_map(src)
    packet = op.func.overloadpacket
    if packet is aten.index_put:
        targets = aten.index.Tensor(mb, values["indices"])
        sources = ms.expand(targets.shape)
    elif packet is aten.index_add:
        targets = mb.index_select(values["dim"], values["index"])
        sources = ms
    else:  # scatter_add, scatter_reduce, scatter.reduce
        index = values["index"]
        targets = mb.gather(values["dim"], index)
        sources = ms[tuple(slice(0, s) for s in index.shape)]
    m = from_pairs(_rows(targets), _rows(sources), (numel, src.numel()))
    return Dep(op.ctx.check(union([bdep.pattern, apply_map(op.ctx, m, sdep.pattern,
                                                            str(op.func))]), str(op.func)),
               tainted)


def _dims(dim: Any, ndim: int) -> list[int]:
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % max(ndim, 1) for d in dims)


def _reduce(p: sp.csr_matrix, shape: tuple, dims: list[int], n: int) -> tuple[sp.csr_matrix,
                                                                              tuple]:
    """Union over ``dims`` (kept with size 1): the pattern and its keepdim shape."""
    kept = tuple(1 if i in dims else s for i, s in enumerate(shape))
    numel_out = int(np.prod(kept, dtype=np.int64))
    if numel_out == 1:
        cols = _distinct_columns(p.indices)
        return _repeat_row(cols, 1, n), kept
    group = torch.arange(numel_out, dtype=torch.int64).reshape(kept).expand(shape)
    rows = np.repeat(group.reshape(-1).numpy(), np.diff(p.indptr))
    out = sp.csr_matrix((np.ones(rows.size, dtype=bool), (rows, p.indices)),
                        shape=(numel_out, n))
    out.sum_duplicates()
    return out, kept


def reduction(op: Op) -> Any:
    """Reductions along dims (sum, mean, amax, prod, var, norm, logsumexp, max.dim values...)."""
    values, deps = op.named()
    if "other" in values:  # max.other, min.other: elementwise
        return pointwise(op)
    dep = deps["self"]
    outs = op.out if isinstance(op.out, tuple | list) else [op.out]
    if dep.pattern is None:
        res = [Dep(None, dep.tainted) for _ in outs]
        return res if isinstance(op.out, tuple | list) else res[0]
    shape = _shape(values["self"])
    dims = _dims(values.get("dim"), len(shape))
    reduced, kept = _reduce(dep.pattern, shape, dims, op.ctx.n)
    res = []
    for o in outs:
        if _floating(o):
            pattern = broadcast(reduced, kept, kept, op.ctx.n)
            res.append(Dep(op.ctx.check(pattern, str(op.func)), True))
        else:
            res.append(Dep(None, True))
    return res if isinstance(op.out, tuple | list) else res[0]


def slice_reduction(op: Op) -> Any:
    """Softmax, sort, topk: every output depends on its whole slice along ``dim``."""
    values, deps = op.named()
    dep = deps["self"]
    outs = op.out if isinstance(op.out, tuple | list) else [op.out]
    if dep.pattern is None:
        res = [Dep(None, dep.tainted) for _ in outs]
        return res if isinstance(op.out, tuple | list) else res[0]
    shape = _shape(values["self"])
    dim = values.get("dim")
    if dim is None:  # msort sorts along the first dim; the others default to the last
        dim = 0 if op_name(op.func) == "msort" else -1
    dims = _dims(dim, len(shape))
    reduced, kept = _reduce(dep.pattern, shape, dims, op.ctx.n)
    res = []
    for o in outs:
        if _floating(o):
            res.append(Dep(op.ctx.check(broadcast(reduced, kept, _shape(o), op.ctx.n),
                                        str(op.func)), True))
        else:
            res.append(Dep(None, True))
    return res if isinstance(op.out, tuple | list) else res[0]


def prefix(op: Op) -> Any:
    """cumsum/cumprod/cummax...: prefix unions along ``dim`` (Hillis-Steele doubling)."""
    values, deps = op.named()
    dep = deps["self"]
    outs = op.out if isinstance(op.out, tuple | list) else [op.out]
    x = values["self"]
    if dep.pattern is None:
        res = [Dep(None, dep.tainted) for _ in outs]
        return res if isinstance(op.out, tuple | list) else res[0]
    dim = values["dim"] % max(x.ndim, 1)
    length = x.shape[dim] if x.ndim else 1
    n = op.ctx.n
    counts = torch.as_tensor(np.diff(dep.pattern.indptr).astype(np.float64)).reshape(x.shape)
    upper = float(counts.cumsum(dim).clamp(max=n).sum()) if x.ndim else float(counts.sum())
    op.ctx.precheck(upper, 0.0, upper, x.numel(), str(op.func))
    p, shift = dep.pattern, 1
    idx = index_map(x)
    while shift < length:
        moved = torch.cat([torch.zeros_like(idx.narrow(dim, 0, shift)),
                           idx.narrow(dim, 0, length - shift)], dim)
        p = op.ctx.check(union([p, take_rows(p, _rows(moved), n)]), str(op.func))
        shift *= 2
    res = [Dep(p, True) if _floating(o) else Dep(None, True) for o in outs]
    return res if isinstance(op.out, tuple | list) else res[0]


def contraction(op: Op) -> Dep:
    """mm, bmm, mv, dot, addmm, baddbmm, addmv: through the nonzero support of the operands.

    ``out[b, i, k] = sum_j A[b, i, j] B[b, j, k]`` depends on ``B[b, j, k]`` where
    ``A[b, i, j]`` may be nonzero and on ``A[b, i, j]`` where ``B[b, j, k]`` may.
    """
    packet = op.func.overloadpacket
    args, deps = list(op.args), list(op.deps)
    bias = None
    if packet in (aten.addmm, aten.baddbmm, aten.addmv, aten._sparse_addmm):
        bias = (args.pop(0), deps.pop(0))
    a, b = args[0], args[1]
    da, db = deps[0], deps[1]
    if a.layout != torch.strided or b.layout != torch.strided:
        return _sparse_contraction(op, a, b, da, db, bias)
    if a.ndim == 1 and b.ndim == 1:  # dot
        a3, b3 = a.reshape(1, 1, -1), b.reshape(1, -1, 1)
    elif b.ndim == 1:  # mv
        a3, b3 = a.unsqueeze(0), b.reshape(1, -1, 1)
    elif a.ndim == 2:
        a3, b3 = a.unsqueeze(0), b.unsqueeze(0)
    else:
        a3, b3 = a, b
    batch, p, q = a3.shape
    r = b3.shape[2]
    n, ctx, what = op.ctx.n, op.ctx, str(op.func)
    out_numel = batch * p * r
    parts = []
    terms = []
    if db.pattern is not None:
        sa = _support(a3, da, ctx)
        counts = np.diff(db.pattern.indptr)
        if counts.size and counts.min() == counts.max():
            # Every row of B's pattern has c entries (x itself: c = 1): the
            # bound is c times A's row counts, without a float matmul.
            per_row = sa.sum(-1, keepdim=True, dtype=torch.float64) * float(counts[0])
            terms.append(per_row.expand(batch, p, r))
        else:
            rnb = torch.as_tensor(counts.astype(np.float64)).reshape(b3.shape)
            terms.append(torch.bmm(sa.double(), rnb))
    if da.pattern is not None:
        sb = _support(b3, db, ctx)
        rna = torch.as_tensor(np.diff(da.pattern.indptr).astype(np.float64)).reshape(a3.shape)
        terms.append(torch.bmm(rna, sb.double()))
    if terms:
        bound = sum(terms)
        upper = float(bound.clamp(max=n).sum())
        lower = 0.0
        if len(terms) == 1 and (_disjoint(db.pattern if db.pattern is not None
                                          else da.pattern, n)):
            lower = upper
        ctx.precheck(upper, lower, float(bound.sum()), out_numel, what)
    if db.pattern is not None:
        bb, i, j = (t.numpy() for t in torch.nonzero(sa, as_tuple=True))
        k = np.arange(r)
        rows = (((bb * p + i) * r)[:, None] + k).reshape(-1)
        cols = (((bb * q + j) * r)[:, None] + k).reshape(-1)
        parts.append(apply_map(ctx, from_pairs(rows, cols, (out_numel, b3.numel())),
                               db.pattern, what))
    if da.pattern is not None:
        bb, j, k = (t.numpy() for t in torch.nonzero(sb, as_tuple=True))
        i = np.arange(p)
        rows = ((bb * p)[:, None] + i) * r + k[:, None]
        cols = ((bb * p)[:, None] + i) * q + j[:, None]
        parts.append(apply_map(ctx, from_pairs(rows.reshape(-1), cols.reshape(-1),
                                               (out_numel, a3.numel())), da.pattern, what))
    if bias is not None and isinstance(bias[1], Dep):
        parts.append(broadcast(bias[1].pattern, _shape(bias[0]), _shape(op.out), n))
    return Dep(ctx.check(union(parts), what), _tainted(op.deps))


def _scipy_support(t: torch.Tensor) -> sp.csr_matrix:
    """Where a 2-D torch sparse (COO/CSR/...) constant is nonzero, as boolean CSR."""
    coo = t.to_sparse_coo().coalesce()
    i, j = coo.indices().cpu().numpy()
    keep = (coo.values() != 0).cpu().numpy()
    return sp.csr_matrix((np.ones(int(keep.sum()), dtype=bool), (i[keep], j[keep])),
                         shape=tuple(t.shape))


def _sparse_contraction(op: Op, a: Any, b: Any, da: Dep, db: Dep, bias: Any) -> Dep:
    """mm/mv/addmm with a torch sparse *constant* matrix (an assembled operator): its stored
    nonzeros are the support. A sparse operand computed from x: the conservative fallback."""
    ctx, n, what = op.ctx, op.ctx.n, str(op.func)
    parts = []
    if a.layout != torch.strided and not da.tainted and b.layout == torch.strided \
            and a.ndim == 2:
        r = 1 if b.ndim == 1 else b.shape[1]
        s = _scipy_support(a)  # out (i, k) <- B (j, k) where A[i, j] != 0
        m = s if r == 1 else sp.kron(s, sp.identity(r, dtype=bool), format="csr")
        parts.append(apply_map(ctx, sp.csr_matrix(m, dtype=bool), db.pattern, what))
    elif b.layout != torch.strided and not db.tainted and a.layout == torch.strided \
            and b.ndim == 2:
        rows = 1 if a.ndim == 1 else a.shape[0]
        s = _scipy_support(b)  # out (i, k) <- A (i, j) where B[j, k] != 0
        m = sp.kron(sp.identity(rows, dtype=bool), s.T, format="csr")
        parts.append(apply_map(ctx, sp.csr_matrix(m, dtype=bool), da.pattern, what))
    else:
        return fallback(op)
    if bias is not None and isinstance(bias[1], Dep):
        parts.append(broadcast(bias[1].pattern, _shape(bias[0]), _shape(op.out), n))
    return Dep(ctx.check(union(parts), what), _tainted(op.deps))


def _disjoint(p: sp.csr_matrix, n: int) -> bool:
    """Each column in at most one row: unions of distinct rows have the summed size."""
    return p.nnz == 0 or int(np.bincount(p.indices, minlength=n).max()) <= 1


def _conv_map(x_shape: tuple, w: torch.Tensor, wdep: Any, values: dict, out_shape: tuple,
              ctx: Context, what: str) -> sp.csr_matrix:
    """The boolean map input -> output of a (not transposed) convolution, ``|weight| > 0``."""
    d = w.ndim - 2
    stride, padding, dilation = values["stride"], values["padding"], values["dilation"]
    numel_in = int(np.prod(x_shape, dtype=np.int64))
    idx = torch.arange(1, numel_in + 1, dtype=torch.int64).reshape(x_shape)
    pad = []
    for s in reversed(range(d)):
        pad += [padding[s], padding[s]]
    idx = torch.nn.functional.pad(idx, pad, value=0)
    for s in range(d):
        span = dilation[s] * (w.shape[2 + s] - 1) + 1
        idx = idx.unfold(2 + s, span, stride[s])[..., :: dilation[s]]
    idx = idx[(slice(None), slice(None), *(slice(0, o) for o in out_shape[2:]))]
    # idx: (B, C, O..., K...) -> (C, K..., B, O...)
    bsz, cin = idx.shape[:2]
    perm = [1, *range(2 + d, 2 + 2 * d), 0, *range(2, 2 + d)]
    patches = idx.permute(perm).reshape(cin * int(np.prod(w.shape[2:])), -1)
    sw = _support(w, wdep if isinstance(wdep, Dep) else CONST, ctx)
    co, ci, *k = torch.nonzero(sw, as_tuple=True)
    cog = w.shape[0] // values["groups"]
    c = (co // cog) * w.shape[1] + ci
    kflat = torch.zeros_like(co)
    for s in range(d):
        kflat = kflat * w.shape[2 + s] + k[s]
    taps = c * int(np.prod(w.shape[2:])) + kflat
    odims = int(np.prod(out_shape[2:]))
    pairs = taps.numel() * bsz * odims
    ctx.precheck(float(pairs), 0.0, float(pairs), int(np.prod(out_shape)), what)
    cols = patches[taps]  # (taps, B * O)
    b_o = torch.arange(bsz * odims)
    rows = (b_o // odims * w.shape[0])[None, :] * odims + co[:, None] * odims + \
        (b_o % odims)[None, :]
    return from_pairs(rows.reshape(-1).numpy(), _rows(cols), (int(np.prod(out_shape)), numel_in))


def convolution(op: Op) -> Dep:
    """``aten.convolution`` (not transposed): patches of the input's index map x |weight| > 0."""
    values, deps = op.named()
    if values["transposed"]:
        return fallback(op)
    x, w = values["input"], values["weight"]
    dx, dw, dbias = deps["input"], deps["weight"], deps["bias"]
    ctx, n, what = op.ctx, op.ctx.n, str(op.func)
    out_shape = _shape(op.out)
    parts = []
    d = w.ndim - 2
    if dx.pattern is not None:
        m = _conv_map(_shape(x), w, dw, values, out_shape, ctx, what)
        parts.append(apply_map(ctx, m, dx.pattern, what))
    if isinstance(dw, Dep) and dw.pattern is not None:
        per_co, _ = _reduce(dw.pattern, _shape(w), list(range(1, w.ndim)), n)
        shape = (1, w.shape[0]) + (1,) * d
        parts.append(broadcast(per_co, shape, out_shape, n))
    if isinstance(dbias, Dep) and dbias.pattern is not None:
        parts.append(broadcast(dbias.pattern, (1, w.shape[0]) + (1,) * d, out_shape, n))
    return Dep(ctx.check(union(parts), what), _tainted(op.deps))


def convolution_backward(op: Op) -> Any:
    """Gradient of a convolution (Hessian traces): grad_input through the transposed map;
    grad_weight and grad_bias as dense blocks (weights are constants in our use)."""
    values, deps = op.named()
    if values["transposed"]:
        return fallback(op)
    go, w = values["grad_output"], values["weight"]
    dgo, dw = deps["grad_output"], deps["weight"]
    ctx, what = op.ctx, str(op.func)
    outs = list(op.out)
    # grad_weight, grad_bias: dense blocks (built only for the outputs asked for)
    block = fallback(Op(op.func, op.args, op.kwargs, op.deps, op.kwdeps,
                        (None, *outs[1:]), ctx), quiet=True)
    res = list(block)
    if outs[0] is not None:
        parts = []
        if dgo.pattern is not None:
            m = _conv_map(_shape(values["input"]), w, dw, values, _shape(go), ctx, what)
            parts.append(apply_map(ctx, m.T.tocsr(), dgo.pattern, what))
        if isinstance(dw, Dep) and dw.pattern is not None:
            parts.append(_repeat_row(_distinct_columns(dw.pattern.indices), outs[0].numel(), ctx.n))
        res[0] = Dep(ctx.check(union(parts), what), _tainted(op.deps))
    return res


def _window_map(values: dict, x_shape: tuple, out_shape: tuple, ctx: Context, what: str
                ) -> sp.csr_matrix:
    """The boolean map input -> output of a pooling window (avg/max, 1-3 d, ceil_mode)."""
    kernel = list(values["kernel_size"])
    d = len(kernel)

    def per_dim(v: Any, default: Any) -> list[int]:
        v = default if v is None or (isinstance(v, list | tuple) and len(v) == 0) else v
        v = list(v) if isinstance(v, list | tuple) else [v]
        return v * d if len(v) == 1 else v

    stride = per_dim(values.get("stride"), kernel)
    padding = per_dim(values.get("padding"), 0)
    dilation = per_dim(values.get("dilation"), 1)
    spatial_in = list(x_shape[-d:])
    spatial_out = list(out_shape[-d:])
    lead = int(np.prod(x_shape[:-d], dtype=np.int64))
    numel_in = int(np.prod(x_shape, dtype=np.int64))
    idx = torch.arange(1, numel_in + 1, dtype=torch.int64).reshape(lead, *spatial_in)
    pads: list[int] = []
    for s in reversed(range(d)):
        span = dilation[s] * (kernel[s] - 1) + 1
        # ceil_mode: windows may run past the padded end; pad those with "no element".
        extra = max(0, (spatial_out[s] - 1) * stride[s] + span - (spatial_in[s] + 2 * padding[s]))
        pads += [padding[s], padding[s] + extra]
    idx = torch.nn.functional.pad(idx, pads, value=0)
    for s in range(d):
        span = dilation[s] * (kernel[s] - 1) + 1
        idx = idx.unfold(1 + s, span, stride[s])[..., :: dilation[s]]
    idx = idx[(slice(None), *(slice(0, o) for o in spatial_out))]
    taps = int(np.prod(kernel))
    out_numel = lead * int(np.prod(spatial_out))
    ctx.precheck(float(out_numel * taps), 0.0, float(out_numel * taps), out_numel, what)
    rows = np.repeat(np.arange(out_numel, dtype=np.int64), taps)
    return from_pairs(rows, _rows(idx.reshape(out_numel, taps)), (out_numel, numel_in))


def window(op: Op) -> Any:
    """Pooling (avg/max, 1-3 d): every output depends on its whole window (index-map patches)."""
    values, deps = op.named()
    x, dep = values["self"], deps["self"]
    outs = op.out if isinstance(op.out, tuple | list) else [op.out]
    if dep.pattern is None:
        res = [Dep(None, dep.tainted) for _ in outs]
        return res if isinstance(op.out, tuple | list) else res[0]
    what = str(op.func)
    m = _window_map(values, _shape(x), _shape(outs[0]), op.ctx, what)
    pattern = apply_map(op.ctx, m, dep.pattern, what)
    res = [Dep(pattern, True) if _floating(o) else Dep(None, True) for o in outs]
    return res if isinstance(op.out, tuple | list) else res[0]


def window_backward(op: Op) -> Dep:
    """Gradient of a pooling window: grad_output through the transposed window map (for max
    pooling, every element of a window: the argmax may change with x)."""
    values, deps = op.named()
    go, dgo = values["grad_output"], deps["grad_output"]
    if dgo.pattern is None:
        return Dep(None, _tainted(op.deps))
    what = str(op.func)
    m = _window_map(values, _shape(values["self"]), _shape(go), op.ctx, what)
    return Dep(op.ctx.check(apply_map(op.ctx, m.T.tocsr(), dgo.pattern, what), what),
               _tainted(op.deps))


def fallback(op: Op, *, quiet: bool = False) -> Any:
    """No rule: every output element depends on every input's dependencies (one warning)."""
    leaves = [d for d in _leaves(list(op.deps) + list(op.kwdeps.values()))]
    cols = [d.pattern.indices for d in leaves if d.pattern is not None]
    tainted = any(d.tainted for d in leaves)
    outs = op.out if isinstance(op.out, tuple | list) else [op.out]
    if cols and not quiet:
        op.ctx.warn(str(op.func), f"sparsity: no rule for {op.func}; every output of it is "
                                  "taken to depend on all of its inputs (a dense block)")
    row = _distinct_columns(np.concatenate(cols)) if cols else None
    res = []
    for o in outs:
        if o is None:
            res.append(CONST)
        elif row is None or not _floating(o):
            res.append(Dep(None, tainted))
        else:
            res.append(Dep(op.ctx.check(_repeat_row(row, o.numel(), op.ctx.n), str(op.func)),
                           True))
    return res if isinstance(op.out, tuple | list) else res[0]


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

_CONSTANT = ["full", "full_like", "zeros", "zeros_like", "ones", "ones_like", "empty",
             "empty_like", "empty_strided", "empty_permuted", "arange", "scalar_tensor", "eye",
             "linspace", "logspace", "new_zeros", "new_ones", "new_full", "new_empty",
             "new_empty_strided"]
_NO_DERIVATIVE = ["sign", "sgn", "floor", "ceil", "round", "trunc", "argmax", "argmin",
                  "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
                  "logical_not", "logical_xor", "isnan", "isinf", "isfinite", "signbit",
                  "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "any", "all",
                  "nonzero", "searchsorted", "bucketize", "heaviside", "isin", "count_nonzero",
                  "_local_scalar_dense", "sym_size", "sym_numel", "sym_stride", "equal",
                  "is_nonzero", "unique", "_unique2", "unique_consecutive", "unique_dim"]
_MOVEMENT = ["view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand",
             "expand_copy", "slice", "select", "unfold", "roll", "flip", "cat", "stack",
             "constant_pad_nd", "index_select", "gather", "index", "_unsafe_index",
             "as_strided", "squeeze", "unsqueeze", "split", "split_with_sizes", "chunk",
             "unbind", "repeat", "diagonal", "narrow", "take", "masked_select", "movedim",
             "permute_copy", "view_copy", "slice_copy", "select_copy", "unsqueeze_copy",
             "squeeze_copy", "transpose_copy", "t_copy", "diagonal_copy", "alias_copy",
             "as_strided_copy", "unbind_copy", "split_copy", "split_with_sizes_copy",
             "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
             "replication_pad2d", "replication_pad3d", "tensor_split", "repeat_interleave",
             "tile", "hstack", "vstack", "tril", "triu", "_reshape_alias", "im2col"]
_IDENTITY = ["clone", "_to_copy", "alias", "lift_fresh_copy", "lift_fresh", "detach",
             "contiguous", "_conj", "conj", "resolve_conj", "resolve_neg", "positive",
             "_assert_tensor_metadata"]
_WRITE = ["slice_scatter", "select_scatter", "diagonal_scatter", "scatter", "index_copy",
          "index_fill", "masked_scatter"]
_ACCUMULATE = ["index_put", "scatter_add", "scatter_reduce", "index_add"]
_REDUCTION = ["sum", "mean", "amax", "amin", "prod", "var", "std", "var_mean", "std_mean",
              "logsumexp", "max", "min", "norm", "linalg_vector_norm", "nansum", "nanmean",
              "median", "nanmedian", "mode", "kthvalue", "aminmax"]
_SLICE = ["_softmax", "_log_softmax", "softmax", "log_softmax", "sort", "topk", "msort"]
_PREFIX = ["cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"]
_CONTRACTION = ["mm", "bmm", "mv", "dot", "addmm", "baddbmm", "addmv", "_sparse_addmm",
                "_sparse_mm", "_sparse_sparse_matmul"]
_WINDOW = ["avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
           "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices"]
def _table() -> dict[str, Callable[[Op], Any]]:
    table: dict[str, Callable[[Op], Any]] = {}
    for names, rule in ((_CONSTANT, constant), (_NO_DERIVATIVE, no_derivative),
                        (_MOVEMENT, movement), (_IDENTITY, identity), (_WRITE, write),
                        (_ACCUMULATE, accumulate), (_REDUCTION, reduction),
                        (_SLICE, slice_reduction), (_PREFIX, prefix),
                        (_CONTRACTION, contraction), (_WINDOW, window)):
        for name in names:
            table[name] = rule
    table.update(mul=multiply, where=where, masked_fill=masked_fill, copy=copy,
                 as_strided_scatter=as_strided_write,
                 convolution=convolution,
                 _convolution=convolution, convolution_backward=convolution_backward)
    for name in ("avg_pool1d_backward", "avg_pool2d_backward", "avg_pool3d_backward",
                 "max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward"):
        table[name] = window_backward
    return table


RULES: dict[str, Callable[[Op], Any]] = _table()


def rule_for(func: Any) -> Callable[[Op], Any] | None:
    """The rule of an ATen op: by name, else the pointwise tag, else None."""
    rule = RULES.get(op_name(func))
    if rule is not None:
        return rule
    if torch.Tag.pointwise in getattr(func, "tags", ()):
        return pointwise
    return None
