"""Sparse Jacobian and Hessian rows from coloured AD passes, and standard sparsity patterns.

Given a pattern and a :class:`~pipeline.sparse.coloring.Coloring`, one AD pass per
colour computes a *compressed* matrix from which every structural nonzero is
read back (Curtis-Powell-Reid; Gebremedhin, Manne, Pothen, SIAM Review 2005):

- ``"fwd"`` (column colouring): ``B = J @ S`` with one JVP per colour, and
  ``J[i, j] = B[i, color[j]]``;
- ``"rev"`` (row colouring): ``B = S.T @ J`` with one VJP per colour, and
  ``J[i, j] = B[color[i], j]``;
- Hessians: ``B = H @ S`` with one Hessian-vector product (forward over
  reverse) per colour, read directly for a column colouring and by the star
  rule (:func:`pipeline.sparse.coloring.star_direct`) for a ``"symmetric"`` one.

Everything here is pure torch/numpy; Ray tasks wrap it.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.core.errors import SparsityError
from pipeline.core.heap import settle_heap
from pipeline.core.kinds import kind_of
from pipeline.maths import checks
from pipeline.maths.compiled import faster, is_compiled, run_pass, settled, would_compile
from pipeline.maths.engine import (
    VmapFallbackWarning,
    hessian_vector_products,
    jvps_by_reverse,
    plain_vjp,
    strict_outputs,
)
from pipeline.problem.problem import Problem
from pipeline.sparse.coloring import Coloring, as_pattern, star_direct


@dataclass(frozen=True)
class SparseRows:
    """Rows ``[start, stop)`` of a sparse Jacobian or Hessian, in CSR layout.

    Args:
        rows: ``int64`` flat row indices ``start .. stop - 1``.
        indptr: ``int64``, length ``len(rows) + 1``: row ``rows[r]`` owns
            ``cols[indptr[r]:indptr[r + 1]]`` and the same slice of ``values``.
        cols: ``int64`` column indices over ``x.reshape(-1)``, sorted per row.
        values: the entries, with the dtype and device of ``x``.
    """

    rows: np.ndarray
    indptr: np.ndarray
    cols: np.ndarray
    values: torch.Tensor

    def to_dense(self, n: int) -> torch.Tensor:
        """The rows as a dense ``(len(rows), n)`` tensor (for tests and small problems)."""
        out = self.values.new_zeros(len(self.rows), n)
        local = np.repeat(np.arange(len(self.rows)), np.diff(self.indptr))
        out[torch.as_tensor(local), torch.as_tensor(self.cols)] = self.values
        return out


def evaluate_rows(
    problem: Problem,
    start: int,
    stop: int,
    coloring: Coloring | Mapping[str, Any],
    *,
    chunk_size: int | None = None,
    pattern: Any = None,
    compile: str = "auto",
) -> SparseRows:
    """Rows ``[start, stop)`` of a problem's sparse Jacobian or Hessian (the worker's entry).

    Args:
        problem: a ``"jacobian"`` or ``"hessian"`` problem.
        pattern: the pattern ``coloring`` colours (``--sparsity FILE``);
            default ``problem.sparsity``.
        start: first row.
        stop: one past the last row.
        coloring: a :class:`~pipeline.sparse.coloring.Coloring`, or a mapping with
            its fields (``colors``, ``num_colors``, ``mode``), e.g. read back
            from JSON.
        chunk_size: AD passes vectorised at once (``None``: all).
        compile: ``"auto"``, ``"on"`` or ``"off"``: ``torch.compile`` the passes
            (:mod:`pipeline.maths.compiled`).

    Returns:
        The rows as :class:`SparseRows`.

    Raises:
        ValueError: no pattern given nor in the problem, a ``"batched"`` problem, or any error
            of :func:`sparse_jacobian_rows` / :func:`sparse_hessian_rows`.
    """
    if isinstance(coloring, Mapping):
        coloring = Coloring(
            colors=np.asarray(coloring["colors"], dtype=np.int64),
            num_colors=int(coloring["num_colors"]),
            mode=str(coloring["mode"]),
        )
    if pattern is None:
        pattern = problem.sparsity
    if pattern is None:
        raise ValueError(
            "sparse evaluation needs Problem.sparsity (a scipy.sparse pattern); "
            "set it in build() or use a dense method"
        )
    kind = kind_of(problem.kind)
    if kind.per_sample:
        raise ValueError(
            f"sparse evaluation supports kind 'jacobian' and 'hessian', got {problem.kind!r}"
        )
    rows = sparse_hessian_rows if kind.symmetric else sparse_jacobian_rows
    return rows(problem.fn, problem.x, start, stop, pattern, coloring, chunk_size=chunk_size,
                compile=compile, keep_plan=False)


def sparse_jacobian_rows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    start: int,
    stop: int,
    pattern: Any,
    coloring: Coloring,
    *,
    chunk_size: int | None = None,
    compile: str = "auto",
    keep_plan: bool = True,
) -> SparseRows:
    """Rows ``[start, stop)`` of the Jacobian of ``fn`` at ``x``, restricted to ``pattern``.

    Only the colours that touch these rows are evaluated: in forward mode the
    colours of the columns present in the rows, in reverse mode the colours of
    the rows themselves.

    Args:
        fn: the function; rows index ``fn(x).reshape(-1)``.
        x: the point (any shape; columns index ``x.reshape(-1)``).
        start: first row.
        stop: one past the last row (``start == stop`` gives no rows).
        pattern: ``(m, n)`` sparsity pattern of the Jacobian.
        coloring: a ``"fwd"`` or ``"rev"`` colouring of ``pattern``, valid in
            the sense of :func:`pipeline.sparse.coloring.validate_coloring`.
        chunk_size: AD passes vectorised at once (``None``: as many as
            :data:`DEFAULT_CHUNK_BYTES` holds).
        compile: ``"auto"`` (compiled once the eager passes have cost about
            what compiling does), ``"on"`` or ``"off"``
            (:mod:`pipeline.maths.compiled`).
        keep_plan: keep the pattern work for the next call with the same
            pattern and colouring objects (NOTE: [compressed plans]).

    Returns:
        The rows as :class:`SparseRows`.

    Raises:
        ValueError: shapes of ``pattern``, ``x``, ``fn(x)`` or the colouring
            disagree, the row range is out of bounds, or the mode is
            ``"symmetric"``.
    """
    strict = strict_outputs(fn)  # the pass's owner stays fn: its compiled passes are kept
    plan = _cached_plan(("jacobian", start, stop, x.numel()), pattern, coloring,
                        lambda: _jacobian_plan(pattern, x.numel(), start, stop, coloring),
                        keep=keep_plan)
    if plan.cols.size == 0:
        return SparseRows(plan.rows, plan.indptr, plan.cols, x.new_zeros(0))
    xf = x.detach().reshape(-1)
    flat = _flat(strict, x.shape)
    key = _key(plan.mode, x, plan, chunk_size)
    fusion = None
    if plan.mode == "fwd":
        fusion = _fusion(fn, key, "jvp+vjp", lambda: _vjp_one(flat), plan, xf, compile,
                         chunk_size)

        def forward(seeds: torch.Tensor, reads: torch.Tensor | None) -> torch.Tensor:
            out, values = _run(fn, key, lambda: _jvps(strict, x.shape), xf, seeds, reads,
                               compile, fusion)  # B: (c, m)
            _check_rows(out.shape[1], plan.m)
            return out if values is None else values

        began = time.perf_counter()
        values = _compressed_values(forward, plan, xf, chunk_size=chunk_size)
        redo: Callable[[], torch.Tensor] | None = lambda: _compressed_values(  # noqa: E731
            _gathering(lambda seeds: jvps_by_reverse(flat, xf, seeds).to(xf.dtype)), plan, xf,
            chunk_size=chunk_size)
    else:

        def reverse(seeds: torch.Tensor, reads: torch.Tensor | None) -> torch.Tensor:
            try:
                out = run_pass(fn, key, _built(lambda: _vjps(strict, x.shape), reads), xf,
                               seeds, *_args(reads), compile=compile)
            except RuntimeError:  # seeds of the wrong length, if fn(x) disagrees with the pattern
                with torch.no_grad():
                    _check_rows(strict(x.detach().clone()).numel(), plan.m)
                raise
            _check_rows(out[-1].numel(), plan.m)  # fn(x)
            return out[0] if reads is None else out[1]  # B (c, n), or its entries

        began = time.perf_counter()
        values, redo = _compressed_values(reverse, plan, xf, chunk_size=chunk_size), None

    def pullback(u: torch.Tensor) -> torch.Tensor:  # Jᵀ u, u over all m outputs
        check = ("vjp", *key[1:])
        return _pulled(fusion, u, lambda: run_check_pass(
            fn, key, check, lambda: _vjp_one(flat), xf, u,
            eager=lambda: plain_vjp(flat, xf, u)[0]), lambda: settled(fn, check))

    schedule = _schedule(fn, plan, x, keep_plan, _compiled(fn, key, fusion))
    values = _checked_values(values, plan, xf, pullback, redo, "sparse Jacobian rows",
                             schedule, time.perf_counter() - began, fusion)
    _done(fusion)
    return SparseRows(plan.rows, plan.indptr, plan.cols, values)


def _jacobian_plan(pattern: Any, n: int, start: int, stop: int, coloring: Coloring) -> _Plan:
    """What a Jacobian's rows need from the pattern: seeds and reads (see :class:`_Plan`)."""
    p = as_pattern(pattern)
    colors = _checked_colors(p, n, start, stop, coloring, ("fwd", "rev"))
    block, rows, row_of = _block(p, start, stop)
    cols = block.indices.astype(np.int64)
    indptr = block.indptr.astype(np.int64)
    m = p.shape[0]
    if coloring.mode == "fwd":
        # NOTE: seeding only the columns present in these rows is enough: a
        # column of the colour that no row here touches adds zero to them.
        return _Plan("fwd", rows, indptr, cols, colors[cols], cols, n, m, colors[cols], row_of)
    # NOTE: likewise only this shard's rows that hold entries are seeded.
    present = rows[np.diff(block.indptr) > 0]
    return _Plan("rev", rows, indptr, cols, colors[present], present, m, n, colors[row_of], cols)


def sparse_hessian_rows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    start: int,
    stop: int,
    pattern: Any,
    coloring: Coloring,
    *,
    chunk_size: int | None = None,
    compile: str = "auto",
    keep_plan: bool = True,
) -> SparseRows:
    """Rows ``[start, stop)`` of the Hessian of a scalar ``fn`` at ``x``, restricted to ``pattern``.

    One Hessian-vector product ``H v`` per needed colour, by forward-over-reverse
    (``jvp`` of ``grad``), vectorised with ``vmap``. The pattern is symmetrised
    (``P | P.T``), as a Hessian's is.

    Args:
        fn: scalar function of ``x``.
        x: the point (any shape; rows and columns index ``x.reshape(-1)``).
        start: first row.
        stop: one past the last row.
        pattern: ``(n, n)`` sparsity pattern of the Hessian.
        coloring: a ``"symmetric"`` (star) colouring, or a ``"fwd"``/``"rev"``
            colouring of the symmetrised pattern (the two coincide there).
        chunk_size: HVPs vectorised at once (``None``: as many as
            :data:`DEFAULT_CHUNK_BYTES` holds).
        compile, keep_plan: as :func:`sparse_jacobian_rows`.

    Returns:
        The rows as :class:`SparseRows`.

    Raises:
        ValueError: the pattern is not ``(n, n)`` for ``n = x.numel()``, the
            colouring has the wrong length, the row range is out of bounds,
            or ``fn(x)`` is not a scalar.
    """
    strict = strict_outputs(fn)
    plan = _cached_plan(("hessian", start, stop, x.numel()), pattern, coloring,
                        lambda: _hessian_plan(pattern, x.numel(), start, stop, coloring),
                        keep=keep_plan)
    if plan.cols.size == 0:
        return SparseRows(plan.rows, plan.indptr, plan.cols, x.new_zeros(0))
    xf = x.detach().reshape(-1)

    def scalar(t: torch.Tensor) -> torch.Tensor:
        y = strict(t.reshape(x.shape))
        if y.numel() != 1:
            raise ValueError(f"a Hessian needs a scalar fn(x), got shape {tuple(y.shape)}")
        return y.reshape(())

    looped: list[Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = []
    key = _key("hvp", x, plan, chunk_size)
    fusion = _fusion(fn, key, "hvp+hvp-rev", lambda: _hvp_one(scalar), plan, xf, compile,
                     chunk_size)

    def products(seeds: torch.Tensor, reads: torch.Tensor | None) -> torch.Tensor:
        # B (c, n): row c = H s_c; or its entries B.flat[reads]
        if looped:
            return looped[0](seeds, reads)
        if checks.forward_policy() == "reverse":  # forward mode disagreed in the run's check
            looped.append(_gathering(hessian_vector_products(scalar, x)))
            return looped[0](seeds, reads)
        try:
            out, values = _run(fn, key, lambda: _hvps(scalar), xf, seeds, reads, compile,
                               fusion)
            return out if values is None else values
        except RuntimeError as exc:
            # NOTE: functions torch.func cannot transform (an old-style
            # autograd.Function, .item() under vmap) get the same compressed
            # matrix by reverse-over-reverse autograd, one HVP per needed colour,
            # as torch.autograd.functional.hessian would compute them.
            warnings.warn(
                f"fn cannot be vectorised with torch.func ({str(exc).splitlines()[0][:160]}); "
                "computing the Hessian-vector products one colour at a time with "
                "torch.autograd.grad",
                VmapFallbackWarning,
                stacklevel=4,
            )
            looped.append(_gathering(hessian_vector_products(scalar, x)))
            return looped[0](seeds, reads)

    began = time.perf_counter()
    values = _compressed_values(products, plan, xf, chunk_size=chunk_size)
    seconds = time.perf_counter() - began

    def by_reverse() -> torch.Tensor:
        return _compressed_values(_gathering(hessian_vector_products(scalar, x)), plan, xf,
                                  chunk_size=chunk_size)

    def pullback(u: torch.Tensor) -> torch.Tensor:  # H u by reverse over reverse
        check = ("hvp-rev", *key[1:])
        return _pulled(fusion, u, lambda: run_check_pass(
            fn, key, check, lambda: _hvp_one(scalar), xf, u,
            eager=lambda: hessian_vector_products(scalar, x)(u[None])[0]),
            lambda: settled(fn, check))

    values = _checked_values(values, plan, xf, pullback, None if looped else by_reverse,
                             "sparse Hessian rows",
                             _schedule(fn, plan, x, keep_plan, _compiled(fn, key, fusion)),
                             seconds, fusion)
    _done(fusion)
    return SparseRows(plan.rows, plan.indptr, plan.cols, values)


def _hessian_plan(pattern: Any, n: int, start: int, stop: int, coloring: Coloring) -> _Plan:
    """What a Hessian's rows need from the pattern (see :class:`_Plan`)."""
    p = as_pattern(pattern)
    if p.shape[0] != p.shape[1]:
        raise ValueError(f"a Hessian pattern must be square, got shape {p.shape}")
    p = (p + p.T).tocsr()
    p.sort_indices()
    colors = _checked_colors(p, n, start, stop, coloring, ("fwd", "rev", "symmetric"))
    block, rows, row_of = _block(p, start, stop)
    cols = block.indices.astype(np.int64)
    if coloring.mode == "symmetric":
        # Entry (i, j) is B[i, color[j]] if j is the only column of its colour
        # in row i, else (star colouring) B[j, color[i]] = H[j, i] = H[i, j].
        direct = star_direct(block, colors)
        read_row = np.where(direct, row_of, cols)
        read_color = np.where(direct, colors[cols], colors[row_of])
    else:
        read_row, read_color = row_of, colors[cols]
    # NOTE: the transposed reads B[j, .] need whole colour classes, so seeds
    # cover every column of each needed colour (not only this shard's).
    in_needed = np.zeros(int(colors.max()) + 1 if colors.size else 0, dtype=bool)
    in_needed[read_color] = True
    seeded = np.flatnonzero(in_needed[colors])
    return _Plan("hvp", rows, block.indptr.astype(np.int64), cols, colors[seeded], seeded, n, n,
                 read_color, read_row)


# ---------------------------------------------------------------------------
# Standard patterns
# ---------------------------------------------------------------------------


def stencil_pattern(N: int, points: int = 5, periodic: bool = False) -> sp.csr_matrix:
    """Sparsity pattern of a 5- or 9-point stencil on an ``N x N`` grid.

    Grid point ``(i, j)`` is flat index ``i * N + j`` (row-major, as
    ``u.reshape(-1)`` of an ``(N, N)`` field).

    Args:
        N: grid points per side.
        points: 5 (centre and the four edge neighbours) or 9 (the 3 x 3 block).
        periodic: wrap around the edges (torus) instead of dropping
            neighbours outside the grid (Dirichlet).

    Returns:
        Boolean ``(N*N, N*N)`` CSR matrix.

    Raises:
        ValueError: ``N < 1`` or ``points`` not 5 or 9.
    """
    if N < 1:
        raise ValueError(f"stencil_pattern: N must be at least 1, got {N}")
    if points == 5:
        offsets = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]
    elif points == 9:
        offsets = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]
    else:
        raise ValueError(f"stencil_pattern: points must be 5 or 9, got {points}")
    i, j = np.divmod(np.arange(N * N, dtype=np.int64), N)
    rows, cols = [], []
    for di, dj in offsets:
        ii, jj = i + di, j + dj
        if periodic:
            ii, jj = ii % N, jj % N
            keep = np.ones(N * N, dtype=bool)
        else:
            keep = (ii >= 0) & (ii < N) & (jj >= 0) & (jj < N)
        rows.append(i[keep] * N + j[keep])
        cols.append(ii[keep] * N + jj[keep])
    return _pattern_from(np.concatenate(rows), np.concatenate(cols), N * N, N * N)


def banded_pattern(n: int, bands: int) -> sp.csr_matrix:
    """Sparsity pattern of an ``n x n`` matrix with ``bands`` centred diagonals.

    Args:
        n: size.
        bands: odd number of diagonals, offsets ``-(bands // 2) .. bands // 2``
            (3: tridiagonal).

    Returns:
        Boolean ``(n, n)`` CSR matrix.

    Raises:
        ValueError: ``n < 1`` or ``bands`` not a positive odd number.
    """
    if n < 1:
        raise ValueError(f"banded_pattern: n must be at least 1, got {n}")
    if bands < 1 or bands % 2 == 0:
        raise ValueError(f"banded_pattern: bands must be a positive odd number, got {bands}")
    half = bands // 2
    i = np.arange(n, dtype=np.int64)
    rows, cols = [], []
    for k in range(-half, half + 1):
        keep = (i + k >= 0) & (i + k < n)
        rows.append(i[keep])
        cols.append(i[keep] + k)
    return _pattern_from(np.concatenate(rows), np.concatenate(cols), n, n)


def _pattern_from(rows: np.ndarray, cols: np.ndarray, m: int, n: int) -> sp.csr_matrix:
    out = sp.csr_matrix((np.ones(rows.size, dtype=bool), (rows, cols)), shape=(m, n))
    out.sum_duplicates()
    out.sort_indices()
    return out


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def _jvps(fn: Callable[[torch.Tensor], torch.Tensor], shape: torch.Size) -> Callable:
    """The forward pass ``(x, seeds) -> J @ seeds.T`` (rows: one JVP per seed)."""
    flat = _flat(fn, shape)

    def jvps(xf: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(lambda v: torch.func.jvp(flat, (xf,), (v,))[1])(seeds)

    return jvps


def _vjps(fn: Callable[[torch.Tensor], torch.Tensor], shape: torch.Size) -> Callable:
    """The reverse pass ``(x, seeds) -> (seeds @ J, fn(x))`` (one VJP per seed)."""
    flat = _flat(fn, shape)

    def vjps(xf: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, pullback = torch.func.vjp(flat, xf)
        return torch.func.vmap(pullback)(seeds)[0], y

    return vjps


def _hvps(scalar: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """The Hessian pass ``(x, seeds) -> H @ seeds.T`` (forward over reverse, one HVP per seed)."""
    grad = torch.func.grad(scalar)

    def hvps(xf: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(lambda v: torch.func.jvp(grad, (xf,), (v,))[1])(seeds)

    return hvps


# NOTE: [the check of a compressed evaluation]
# One reverse pass checks the whole result, decompressed: for random u over
# these rows and v over the columns, u . (J_P v), with J_P the rows' entries
# as read from the pattern P, against (Jᵀ u) . v, with Jᵀ u (Hessians: H u)
# by reverse mode over every entry of J. They agree (to the adjoint check's
# tolerance, NOTE: [Checks on every engine call]) only if forward and reverse
# mode differentiate the same function *and* J has no nonzero outside P, in
# any row or column (a missed entry J[i, j] shifts (Jᵀ u)_j by u_i J[i, j]):
# the earlier check compared the compressed matrix before decompression and
# so could not see a pattern's misses. On a disagreement the rows are
# computed again by reverse mode (the seeds' JVPs by double backward, Hessians
# reverse over reverse); if those agree, forward mode was at fault (reported;
# reverse mode's rows under the ``fallback`` policy), else the pattern misses
# nonzeros and the call is refused (SparsityError). The check's pass is
# compiled when the evaluation's pass is (its eager form is plain autograd,
# as torch.autograd.functional's), and u . (J_P v) is one dot of the entries
# with w_k = u[row_k] v[col_k], kept with the plan (the gap is first judged
# against |Jᵀu| |v|, a lower bound of the scale over n entries: within the
# tolerance of that it agrees, and |vals|, another pass over every entry, is
# never read; measured gaps sat 3-4 orders of magnitude inside): together 40-90% of a
# compiled evaluation at n = 10^5 (benchmarks/peers.py), against 1-8x for the
# eager reverse pass before; repeated calls are checked on a schedule
# (NOTE: [Spaced checks of repeated evaluations] in pipeline.maths.checks).


def _checked_values(values: torch.Tensor, plan: _Plan, xf: torch.Tensor,
                    pullback: Callable[[torch.Tensor], torch.Tensor],
                    redo: Callable[[], torch.Tensor] | None, what: str,
                    schedule: checks.Schedule, seconds: float,
                    fusion: _Fusion | None = None) -> torch.Tensor:
    """``values`` after the check (NOTE: [the check of a compressed evaluation]), when due.

    ``seconds``: what the evaluation took (NOTE: [Spaced checks of repeated evaluations]).
    ``fusion``: the call's fused pass, whose graph may have computed the check's dots.
    """
    if not checks.forward_checks() or values.numel() == 0 or not checks.due(schedule, seconds):
        return values
    began = time.perf_counter()
    u_full, v, w, vw = _probe(plan, xf)
    tol = max(checks.tolerance(xf.dtype), checks.tolerance(values.dtype))  # verdict's

    def gap(vals: torch.Tensor, jtu: torch.Tensor, tol: float,
            known: tuple[float, float, float] | None = None) -> tuple[float, float, float]:
        # u . (J_P v) = sum_k vals_k u[row_k] v[col_k]: one dot with w, in float64;
        # the Cauchy-Schwarz bounds |vals| |w| and |Jᵀu| |v| (NOTE: [Tolerance of
        # the adjoint check]).
        # The scale is at least |Jᵀu| |v| (n entries): a gap within the tolerance
        # of that agrees without |vals| (one more pass over every entry).
        # known: (u . (J_P v), (Jᵀu) . v, |Jᵀu|) from a fused graph (_with_check).
        vals = vals.detach()
        if known is None:
            a = float(torch.dot(vals.to(torch.float64), w))
            jtu = jtu.detach().reshape(-1).to(torch.float64)
            b = float(torch.dot(jtu, v))
            known = (a, b, float(jtu.norm()))
        a, b, low = known[0], known[1], known[2] * vw[1]
        if math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tol * low:
            return a, b, abs(a - b) / low if low > 0 else 0.0
        scale = max(float(vals.norm()) * vw[0], low)
        if not all(math.isfinite(t) for t in (a, b, scale)):
            return a, b, float("nan")
        return a, b, abs(a - b) / scale if scale > 0 else (0.0 if a == b else float("inf"))

    compiles = _CHECK_COMPILES[0]
    try:
        jtu = pullback(u_full)
        known = fusion.dots if fusion is not None and fusion.pulled is not None else None
        dotted = time.perf_counter()
        found = gap(values, jtu, tol, known)
        if fusion is not None:  # the dots are part of either way's time (_Choice)
            fusion.seconds += time.perf_counter() - dotted
        reason = checks.verdict(*found, xf.dtype, values.dtype)
    except Exception:  # noqa: BLE001 - a reverse pass that cannot run is not a verdict
        reason = None
    # a check that compiled its pass is timed again on the next call
    spent = time.perf_counter() - began if compiles == _CHECK_COMPILES[0] else 0.0
    checks.checked(schedule, spent, agreed=reason is None)
    if reason is None:
        return values
    redone = redo() if redo is not None else None
    if redone is None or checks.verdict(*gap(redone, jtu, checks.tolerance(xf.dtype)),
                                         xf.dtype) is not None:
        a, b, rel = gap(values, jtu, 0.0)  # the full scale, for the message
        raise SparsityError(
            f"{what}: the sparsity pattern misses nonzeros at this x: u.(A v) = {a:.6g} "
            f"from the pattern's entries, (A^T u).v = {b:.6g} by reverse mode over all of A "
            f"(relative difference {rel:.2g}); detect the pattern again "
            "(pipeline.sparse.detect.detect_sparsity) or pass one that holds every nonzero")
    keep = checks.forward_policy() == "warn"
    then = ("forward mode's rows kept (--method fwd); use reverse mode" if keep
            else "computed by reverse mode instead")
    checks.report(f"{what}: {reason}; {then}", checks.ForwardModeWarning)
    return values if keep else redone


#: Per user function (weakly): the check schedules of its repeated evaluations.
_SCHEDULES: weakref.WeakKeyDictionary[Any, dict[tuple, tuple[Any, checks.Schedule]]] = (
    weakref.WeakKeyDictionary())


def _schedule(fn: Any, plan: _Plan, x: torch.Tensor, keep: bool, compiled: bool
              ) -> checks.Schedule:
    """The check schedule of ``fn``'s evaluations of ``plan`` at ``x``'s shape, dtype, device.

    Compiled and eager evaluations have one each: the first compiled call is
    checked (its check's pass compiled with it), as the first eager one was.

    A new one (the call is checked) where nothing is kept: ``keep_plan=False``
    (a shard's block, evaluated once), or ``fn`` not weakly referenceable.
    """
    if not keep:
        return checks.Schedule()
    try:
        per = _SCHEDULES.setdefault(fn, {})
    except TypeError:
        return checks.Schedule()
    key = (id(plan), x.shape, x.dtype, x.device, compiled)
    hit = per.get(key)
    if hit is None or hit[0]() is not plan:
        for stale in [k for k, (ref, _) in per.items() if ref() is None]:
            del per[stale]
        hit = per[key] = (weakref.ref(plan), checks.Schedule())
    return hit[1]


def _probe(plan: _Plan, xf: torch.Tensor) -> tuple[Any, ...]:
    """The check's ``u`` over all rows, ``v`` and ``w_k = u[row_k] v[col_k]`` (float64), norms."""
    kept = plan.tensors.get(("check", xf.dtype, xf.device))
    if kept is None:
        key = (len(plan.rows), xf.numel())
        u = checks.uniform((len(plan.rows),), xf, 7, *key).to(torch.float64)
        v = checks.uniform((xf.numel(),), xf, 8, *key).to(torch.float64)
        u_full = xf.new_zeros(plan.m)
        u_full[int(plan.rows[0]):int(plan.rows[-1]) + 1] = u
        local = np.repeat(np.arange(len(plan.rows)), np.diff(plan.indptr))
        w = u[_index(local, xf)] * v[_index(plan.cols, xf)]
        kept = (u_full, v, w, (float(w.norm()), float(v.norm())))
        plan.tensors[("check", xf.dtype, xf.device)] = kept
    return kept


def run_check_pass(owner: Any, evaluation: tuple, key: tuple, build: Callable[[], Callable],
                   xf: torch.Tensor, u: torch.Tensor, *, eager: Callable[[], torch.Tensor]
                   ) -> torch.Tensor:
    """The check's reverse pass: compiled where the evaluation's pass ``evaluation`` is."""
    if is_compiled(owner, evaluation):
        _CHECK_COMPILES[0] += not is_compiled(owner, key)
        return run_pass(owner, key, build, xf, u, compile="on", eager=eager)
    return eager()


#: How many check passes have been compiled (their first call's time is the compiler's).
_CHECK_COMPILES = [0]


# NOTE: [the check fused into the pass]
# Where every call is checked (the default) and the evaluation's forward-mode
# pass (JVPs; Hessians: forward over reverse) runs compiled, the check's
# reverse pass (Jᵀ u; H u by reverse over reverse) can be compiled into the
# same graph, ``(x, seeds, reads, u, v, w) -> (B, entries, Jᵀ u, dots)``: one
# call instead of two, fn's forward (and a Hessian's gradient) traced once for
# both, on two threads the check's lane evens out a pass of an odd number of
# colours, and the check's three dots (u . (J_P v) as entries . w, w the
# check's weight of each entry, _probe; (Jᵀu) . v; |Jᵀu|) are reductions
# inside the graph instead of passes of their own over the entries afterwards
# (0.17-0.7 ms at n = 10^5; the entries are read in the graph, NOTE: [entries
# read inside the compiled pass]). A call in chunks of colours runs apart.
# Whether that is faster depends on the code inductor makes of it (side by
# side on 2 threads, ``python -m benchmarks.forms``, the dots included on both
# sides: ARWHEAD's Hessian 0.74x the calls apart, Rosenbrock's 0.77x,
# BROYDN3D's 0.81x, the Brusselator's Jacobian 0.85x, heat's 0.87x; before the
# dots moved into the graph, Rosenbrock's was 1.16x), so it is chosen by
# measurement: the first checked compiled calls
# of an evaluation alternate between fused and apart, FUSION_TRIALS timed
# calls of each after its first, each with its dots (a call whose passes
# compiled or are still on trial, NOTE: [two codegens per pass], is not
# timed), and the faster by the
# least of those (pipeline.maths.compiled.faster) is kept for the evaluation
# (function, pass, shapes) from then on.
# The check itself is the same either way: the same reverse-mode pass of the
# same fn, the same verdict and the same recomputation on a disagreement. A
# fused graph that fails to compile warns once (CompileFallbackWarning) and
# leaves the passes apart, as they are where checks are spaced (an unchecked
# call then runs the pass alone) and in eager mode.
#: Timed checked calls of each way, fused and apart (after its first), before the faster
#: is kept.
FUSION_TRIALS = 3


@dataclass
class _Choice:
    """Seconds of an evaluation's checked calls fused and apart, until one is chosen."""

    fused: list[float] = field(default_factory=list)
    apart: list[float] = field(default_factory=list)
    chosen: bool | None = None  # True: fused

    def next(self) -> bool:
        """Whether the next call runs fused: the choice, else alternately, fused first."""
        return self.chosen if self.chosen is not None else len(self.fused) <= len(self.apart)

    def record(self, fused: bool, seconds: float) -> None:
        if self.chosen is not None:  # kept: no more timing
            return
        (self.fused if fused else self.apart).append(seconds)
        if min(len(self.fused), len(self.apart)) > FUSION_TRIALS:
            self.chosen = not faster(self.apart, self.fused)


#: Per user function (weakly): each evaluation's choice, by its fused pass's key.
_CHOICES: weakref.WeakKeyDictionary[Any, dict[tuple, _Choice]] = weakref.WeakKeyDictionary()


@dataclass
class _Fusion:
    """One checked compiled call, fused or apart (NOTE: [the check fused into the pass])."""

    key: tuple
    build_check: Callable[[], Callable]
    u: torch.Tensor
    v: torch.Tensor
    w: torch.Tensor  # per entry: u . (J_P v) = values . w (_probe)
    fused: bool
    choice: _Choice
    used: bool = False
    pulled: torch.Tensor | None = None
    dots: tuple[float, float, float] | None = None  # u . (J_P v), (Jᵀu) . v, |Jᵀu|
    seconds: float = 0.0
    timed: bool = True  # no compile in this call's passes
    checked: bool = False


def _fusion(fn: Any, key: tuple, name: str, build_check: Callable[[], Callable], plan: _Plan,
            xf: torch.Tensor, compile: str, chunk_size: int | None) -> _Fusion | None:
    """This call's :class:`_Fusion` where it is checked, its pass runs compiled in one chunk
    and fused is (or may be) the faster way; else None (the passes apart, untimed)."""
    if not (checks.forward_checks() and checks.every_call()) or plan.cols.size == 0:
        return None
    if _step(plan, xf, chunk_size) < _ranks(plan)[0]:
        return None  # in chunks: apart
    fused = (name, *key[1:])
    if not would_compile(fn, key, compile):
        return None
    try:
        choice = _CHOICES.setdefault(fn, {}).setdefault(fused, _Choice())
    except TypeError:  # not weakly referenceable: never compiled
        return None
    if not would_compile(fn, fused, "on"):  # it failed to compile
        choice.chosen = False
    if choice.chosen is False:
        return None
    u, v, w = _probe(plan, xf)[:3]
    return _Fusion(fused, build_check, u, v, w, choice.next(), choice)


def _run(fn: Any, key: tuple, build: Callable[[], Callable], xf: torch.Tensor,
         seeds: torch.Tensor, reads: torch.Tensor | None, compile: str,
         fusion: _Fusion | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``B``, the pass ``build()`` on ``seeds``, and its entries ``B.flat[reads]`` (None
    where ``reads`` is: a chunk's ``B`` alone); the first of a fused call also computes the
    check's."""
    if fusion is None or fusion.used:
        out = run_pass(fn, key, _built(build, reads), xf, seeds, *_args(reads),
                       compile=compile)
        return (out, None) if reads is None else out
    assert reads is not None  # a fused call is one chunk
    fusion.used = True
    fusion.timed = settled(fn, fusion.key if fusion.fused else key)  # not on trial
    began = time.perf_counter()
    if not fusion.fused:
        out = run_pass(fn, key, _built(build, reads), xf, seeds, reads, compile=compile)
        fusion.seconds += time.perf_counter() - began
        return out

    def both() -> Callable:
        return _with_check(_gathered(build()), fusion.build_check())

    b, values, fusion.pulled, dots = run_pass(
        fn, fusion.key, both, xf, seeds, reads, fusion.u, fusion.v, fusion.w, compile="on",
        eager=lambda: (*run_pass(fn, key, _built(build, reads), xf, seeds, reads,
                                 compile="off"), None, None))
    if dots is not None:
        fusion.dots = tuple(dots.tolist())
    fusion.seconds += time.perf_counter() - began
    return b, values


def _with_check(evaluate: Callable, check: Callable) -> Callable:
    """The fused pass ``(x, seeds, reads, u, v, w) -> (B, entries, Jᵀu, [entries . w,
    (Jᵀu) . v, |Jᵀu|])``.

    ``(B, entries) = evaluate(x, seeds, reads)`` (:func:`_gathered`) and ``Jᵀu =
    check(x, u)``; the check's three dots in float64 (:func:`_checked_values`), inside
    the graph instead of passes of their own over the entries after it.
    """

    def fused(xf: torch.Tensor, seeds: torch.Tensor, reads: torch.Tensor, u: torch.Tensor,
              v: torch.Tensor, w: torch.Tensor) -> tuple:
        b, values = evaluate(xf, seeds, reads)[:2]
        pulled = check(xf, u)
        j = pulled.reshape(-1).to(torch.float64)
        dots = torch.stack([torch.dot(values.to(torch.float64), w), torch.dot(j, v),
                            torch.linalg.vector_norm(j)])
        return b, values, pulled, dots

    return fused


# NOTE: [entries read inside the compiled pass]
# A call in one chunk of colours (the usual case) reads its entries
# B.flat[reads] inside the pass: ``(x, seeds, reads) -> (B, entries)``,
# compiled as one graph, instead of an eager index_select after it. ATen's
# index_select of a 1-d tensor runs on one thread (0.28 ms for 5 x 10^5
# entries on 1 or 2 threads); inductor's read is a loop of the compiled
# kernel on every thread, with no call of its own. B stays an output: left
# out, inductor computed each entry from x at its read instead of reading B
# (recomputing what several entries share: ARWHEAD's Hessian took 2.7x the
# passes apart). Side by side (``python -m benchmarks.forms``, 2 threads,
# default inductor settings, unchecked): 0.78-0.94x the pass followed by
# index_select (the Brusselator's Jacobian 0.78x, ARWHEAD's Hessian 0.81x,
# Rosenbrock's 0.86x, BROYDN3D's 0.89x, heat's Jacobian at N = 300 0.94x).
# Its eager form is the same index_select.
# The chunked calls read each chunk's entries after its pass, as before.


def _key(mode: str, x: torch.Tensor, plan: _Plan, chunk_size: int | None) -> tuple:
    """A call's pass key: one chunk's pass reads its entries too (NOTE: [entries read
    inside the compiled pass]), a pass of its own."""
    key = (mode, x.shape, x.dtype, x.device)
    one = _step(plan, x, chunk_size) == _ranks(plan)[0]
    return (*key, "entries") if one else key


def _gathered(inner: Callable) -> Callable:
    """The pass ``inner: (x, seeds) -> B`` (or ``(B, *rest)``) as ``(x, seeds, reads) ->
    (B, B.flat[reads], *rest)`` (NOTE: [entries read inside the compiled pass])."""

    def entries(xf: torch.Tensor, seeds: torch.Tensor, reads: torch.Tensor) -> tuple:
        out = inner(xf, seeds)
        b, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        return (b, b.reshape(-1).index_select(0, reads), *rest)

    return entries


def _built(build: Callable[[], Callable], reads: torch.Tensor | None) -> Callable[[], Callable]:
    """``build``, or where a call reads its entries in the pass, its :func:`_gathered` form."""
    return build if reads is None else lambda: _gathered(build())


def _args(reads: torch.Tensor | None) -> tuple:
    return () if reads is None else (reads,)


def _gathering(apply: Callable[[torch.Tensor], torch.Tensor]
               ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """An eager ``seeds -> B`` as :func:`_compressed_values` calls it: ``B``, or its entries
    ``B.flat[reads]``."""

    def call(seeds: torch.Tensor, reads: torch.Tensor | None) -> torch.Tensor:
        b = apply(seeds)
        return b if reads is None else b.reshape(-1).index_select(0, reads)

    return call


def _pulled(fusion: _Fusion | None, u: torch.Tensor, check: Callable[[], torch.Tensor],
            compiled: Callable[[], bool]) -> torch.Tensor:
    """The check's ``Jᵀ u``: held from a fused pass, else ``check()`` (timed where apart and
    ``compiled()``: its pass runs in the form it keeps)."""
    if fusion is None or not fusion.used or u is not fusion.u:
        return check()
    if fusion.pulled is not None:
        fusion.checked = True
        return fusion.pulled
    fusion.timed = fusion.timed and compiled()
    began = time.perf_counter()
    out = check()
    fusion.seconds += time.perf_counter() - began
    fusion.checked = True
    return out


def _done(fusion: _Fusion | None) -> None:
    """Count a checked call's seconds towards its evaluation's choice of way."""
    if fusion is not None and fusion.used and fusion.checked and fusion.timed:
        fusion.choice.record(fusion.fused, fusion.seconds)


def _compiled(fn: Any, key: tuple, fusion: _Fusion | None) -> bool:
    """Whether the evaluation's pass ran compiled (alone or fused with the check's)."""
    return is_compiled(fn, key) or (fusion is not None and is_compiled(fn, fusion.key))


def _vjp_one(flat: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """The check's reverse pass ``(x, u) -> Jᵀ u`` (one VJP, no vmap)."""

    def vjp(xf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.func.vjp(flat, xf)[1](u)[0]

    return vjp


def _hvp_one(scalar: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """The check's Hessian pass ``(x, u) -> H u`` by reverse over reverse (no forward mode)."""
    grad = torch.func.grad(scalar)

    def hvp(xf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.func.vjp(grad, xf)[1](u)[0]

    return hvp


def _flat(fn: Callable[[torch.Tensor], torch.Tensor], shape: torch.Size) -> Callable:
    def flat(t: torch.Tensor) -> torch.Tensor:
        return fn(t.reshape(shape)).reshape(-1)

    return flat


def _checked_colors(
    p: sp.csr_matrix,
    numel: int,
    start: int,
    stop: int,
    coloring: Coloring,
    modes: tuple[str, ...],
) -> np.ndarray:
    m, n = p.shape
    if numel != n:
        raise ValueError(
            f"pattern has {n} columns but x has {numel} entries; the pattern must be "
            "(len(fn(x).reshape(-1)), len(x.reshape(-1)))"
        )
    if not 0 <= start <= stop <= m:
        raise ValueError(f"row range [{start}, {stop}) is not within [0, {m}]")
    if coloring.mode not in modes:
        raise ValueError(f"colouring mode {coloring.mode!r} is not usable here; expected {modes}")
    colors = np.asarray(coloring.colors, dtype=np.int64)
    size = m if coloring.mode == "rev" else n
    if colors.shape != (size,):
        raise ValueError(f"{coloring.mode} colouring has shape {colors.shape}, expected ({size},)")
    return colors


def _check_rows(got: int, m: int) -> None:
    if got != m:
        raise ValueError(f"fn(x) has {got} entries but the pattern has {m} rows")


def _block(p: sp.csr_matrix, start: int, stop: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    block = p[start:stop]
    block.sort_indices()
    rows = np.arange(start, stop, dtype=np.int64)
    return block, rows, np.repeat(rows, np.diff(block.indptr))


#: Bytes the seeds, outputs and tangents of one chunk of AD passes may take
#: when the caller gives no ``chunk_size`` (a direct engine call; the worker
#: passes one from ``--memory-budget``).
DEFAULT_CHUNK_BYTES = 2**30


@dataclass(frozen=True)
class _Plan:
    """What rows ``[start, stop)`` need from the pattern and colouring, computed once.

    ``B = apply(S)`` has one row per distinct colour of ``seed_colors``, each
    a seed with ones at ``seed_positions`` (length ``seed_size``) and
    ``out_size`` columns; the entries are ``B[read_colors, read_index]`` in
    the CSR order of ``rows``/``indptr``/``cols``.
    """

    mode: str
    rows: np.ndarray
    indptr: np.ndarray
    cols: np.ndarray
    seed_colors: np.ndarray
    seed_positions: np.ndarray
    seed_size: int
    out_size: int
    read_colors: np.ndarray
    read_index: np.ndarray
    #: Seeds and read indices of a one-chunk evaluation, per (dtype, device),
    #: and ``"ranks"``: each seed's and read's row of ``S``.
    tensors: dict = field(default_factory=dict, compare=False)

    @property
    def m(self) -> int:
        """Rows of the pattern: entries ``fn(x)`` must have."""
        return self.seed_size if self.mode == "rev" else self.out_size


# NOTE: [compressed plans]
# A Newton or time-stepping loop evaluates the same pattern many times: the
# pattern work (symmetrising, the row block, the star reads, the seeds) is
# done once per (pattern, colouring, rows, x size) and kept for the last
# _MAX_PLANS calls, _MAX_PLAN_BYTES in all (the 10^6 heat stencil's is about
# 250 MB). A shard's worker evaluates each block once, so evaluate_rows (its
# entry) keeps none. Keyed by the objects' identity (and held, so the ids stay
# theirs): a pattern changed in place must be passed as a new object.
_MAX_PLANS = 4
_MAX_PLAN_BYTES = 2**29
#: A one-chunk evaluation keeps its seed tensor up to this size.
_MAX_KEPT_SEEDS = 2**26
_PLANS: OrderedDict[tuple, tuple[Any, Any, _Plan]] = OrderedDict()


def _cached_plan(key: tuple, pattern: Any, coloring: Coloring, build: Callable[[], _Plan],
                 *, keep: bool = True) -> _Plan:
    if not keep:
        return build()
    settle_heap()  # a kept plan is evaluated again and again (NOTE: [glibc's mmap threshold])
    full = (id(pattern), id(coloring), *key)
    hit = _PLANS.get(full)
    if hit is not None and hit[0] is pattern and hit[1] is coloring:
        _PLANS.move_to_end(full)
        return hit[2]
    plan = build()
    _PLANS[full] = (pattern, coloring, plan)
    while len(_PLANS) > _MAX_PLANS or sum(
            _plan_bytes(entry[2]) for entry in _PLANS.values()) > _MAX_PLAN_BYTES:
        _PLANS.popitem(last=False)
    return plan


def _plan_bytes(plan: _Plan) -> int:
    arrays = (plan.rows, plan.indptr, plan.cols, plan.seed_colors, plan.seed_positions,
              plan.read_colors, plan.read_index)
    kept = sum(1 for key in plan.tensors if key != "ranks" and key[0] != "check")
    probes = sum(1 for key in plan.tensors if key[0] == "check")  # w: a float64 per entry
    return 2 * sum(a.nbytes for a in arrays) + _MAX_KEPT_SEEDS * kept + probes * plan.cols.nbytes


def _compressed_values(
    apply: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    plan: _Plan,
    like: torch.Tensor,
    *,
    chunk_size: int | None,
) -> torch.Tensor:
    """Entries ``B[read_colors, read_index]`` of the compressed matrix ``B = apply(S, None)``.

    ``apply(S, reads)`` with ``reads`` (one chunk) returns the entries ``B.flat[reads]``
    itself (NOTE: [entries read inside the compiled pass]).

    ``S`` (see :class:`_Plan`) is built and passed through ``apply`` a chunk
    of colours at a time, so neither the seeds nor ``B`` are ever whole in
    memory: ``chunk_size`` colours per chunk, or as many as
    :data:`DEFAULT_CHUNK_BYTES` holds.
    """
    k, rank, pos = _ranks(plan)
    size = plan.seed_size
    step = _step(plan, like, chunk_size)
    if step == k:  # one chunk (the usual case): no sorting, tensors kept for the next call
        seeds, flat = _one_chunk(plan, like)
        return apply(seeds, flat)
    values = like.new_empty(pos.size)
    by_seed = np.argsort(rank, kind="stable")
    by_read = np.argsort(pos, kind="stable")
    edges = np.arange(0, k + step, step).clip(max=k)
    seed_cut = np.searchsorted(rank[by_seed], edges)
    read_cut = np.searchsorted(pos[by_read], edges)
    for c in range(edges.size - 1):
        s = by_seed[seed_cut[c]:seed_cut[c + 1]]
        r = by_read[read_cut[c]:read_cut[c + 1]]
        seeds = like.new_zeros(int(edges[c + 1] - edges[c]), size)
        seeds[_index(rank[s] - edges[c], like), _index(plan.seed_positions[s], like)] = 1
        block = apply(seeds, None)
        at = (_index(pos[r] - edges[c], like), _index(plan.read_index[r], like))
        values[_index(r, like)] = block[at]
    return values


def _ranks(plan: _Plan) -> tuple[int, np.ndarray, np.ndarray]:
    """The number of seeds (distinct colours), and each seed's and each read's row of ``S``
    (once per plan)."""
    ranks = plan.tensors.get("ranks")
    if ranks is None:
        needed, rank = _distinct(plan.seed_colors)
        lookup = np.full(int(needed.max()) + 1, -1, dtype=np.int64)
        lookup[needed] = np.arange(needed.size)
        ranks = plan.tensors["ranks"] = (needed.size, rank, lookup[plan.read_colors])
    return ranks


def _flat_reads(plan: _Plan) -> np.ndarray:
    """Each entry's flat index into a one-chunk ``B`` (``B[pos, read_index]``)."""
    return _ranks(plan)[2] * plan.out_size + plan.read_index


def _step(plan: _Plan, like: torch.Tensor, chunk_size: int | None) -> int:
    """Seeds per chunk: ``chunk_size``, or as many as :data:`DEFAULT_CHUNK_BYTES` holds."""
    k = _ranks(plan)[0]
    step = chunk_size or DEFAULT_CHUNK_BYTES // max(
        1, 4 * (plan.seed_size + plan.out_size) * like.element_size())
    return max(1, min(step, k))


def _one_chunk(plan: _Plan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeds ``S`` of a one-chunk evaluation and the entries' flat indices into ``B``,
    kept with the plan for the next call (seeds up to :data:`_MAX_KEPT_SEEDS`)."""
    kept = plan.tensors.get((like.dtype, like.device))
    if kept is None:
        k, rank, _ = _ranks(plan)
        seeds = like.new_zeros(k, plan.seed_size)
        seeds[_index(rank, like), _index(plan.seed_positions, like)] = 1
        # B[pos, read_index] as one flat gather (about 2x faster than 2-D indexing),
        # by int32 indices where B allows (0.75-0.85x the time of int64's: fewer bytes)
        flat = _index(_flat_reads(plan), like)
        if k * plan.out_size < 2**31:
            flat = flat.to(torch.int32)
        kept = (seeds, flat)
        if seeds.numel() * seeds.element_size() <= _MAX_KEPT_SEEDS:
            plan.tensors[(like.dtype, like.device)] = kept
    return kept


def _distinct(colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(colors, return_inverse=True)`` for small non-negative integers.

    A presence table instead of a sort: O(len(colors)), about 10x faster than
    ``np.unique`` on the 5e6 entries of a 1000 x 1000 5-point stencil.
    """
    colors = np.asarray(colors, dtype=np.int64)
    present = np.zeros(int(colors.max()) + 1 if colors.size else 0, dtype=bool)
    present[colors] = True
    rank = np.cumsum(present) - 1  # rank[c]: position of colour c among the present ones
    return np.flatnonzero(present), rank[colors]


def _index(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.long, device=like.device)


def load_pattern(path: str) -> sp.csr_matrix:
    """Read a sparsity pattern from ``.npz`` (``scipy.sparse.save_npz``) or Parquet.

    A Parquet pattern has integer columns ``row`` and ``col`` (COO), and may
    carry its shape as schema metadata ``shape`` = ``"m,n"``; without it the
    shape is ``(max row + 1, max col + 1)``. Neither format executes or
    unpickles anything (``load_npz`` reads with ``allow_pickle=False``).

    Raises:
        JacpipeError: a missing file, an unknown suffix, or bad contents.
    """
    import os

    from pipeline.core.errors import JacpipeError

    if not os.path.exists(path):
        raise JacpipeError(f"--sparsity {path}: no such file")
    try:
        if path.endswith(".npz"):
            return as_pattern(sp.load_npz(path))
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if not {"row", "col"} <= set(table.column_names):
                raise JacpipeError(f"--sparsity {path}: expected integer columns row and col")
            r = table.column("row").to_numpy().astype(np.int64)
            c = table.column("col").to_numpy().astype(np.int64)
            meta = table.schema.metadata or {}
            if b"shape" in meta:
                shape = tuple(int(v) for v in meta[b"shape"].decode().split(","))
            else:
                shape = (int(r.max()) + 1 if r.size else 0, int(c.max()) + 1 if c.size else 0)
            data = np.ones(r.size, dtype=bool)
            return as_pattern(sp.csr_matrix((data, (r, c)), shape=shape))
    except JacpipeError:
        raise
    except (ValueError, OSError) as exc:
        raise JacpipeError(f"--sparsity {path}: cannot read a pattern ({exc})") from None
    raise JacpipeError(f"--sparsity {path}: expected a .npz or .parquet file")
