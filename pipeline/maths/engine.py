"""The maths: rows of Jacobians, Hessians and per-sample Jacobians. No Ray here.

Every function computes a contiguous range ``[start, stop)`` of rows of a
derivative, in chunks, and either returns them (``*_rows``) or yields them
chunk by chunk (``iter_rows``) so a caller can stream them to disk without
holding the whole range.

NOTE: [Rows by reverse mode]
    Row ``i`` of ``J = d f(x) / d x`` is ``e_iᵀ J``, one vector-Jacobian
    product. Autograd records the forward pass once (NOTE: [Rows by plain
    autograd under vmap]); ``vmap`` over its pullback then evaluates many
    ``e_iᵀ J`` in one batched backward pass. We
    build each chunk's basis rows lazily, so memory is ``chunk × (m + n +
    activations)`` and never ``rows × m``.

NOTE: [Rows by forward mode]
    Column ``j`` of ``J`` is ``J e_j``, one Jacobian-vector product over all
    ``m`` outputs. For tall Jacobians (``m ≫ n``) ``n`` JVPs give every row at
    once: a shard computes ``J e_j`` for all ``j`` in column chunks and keeps its
    own rows.

NOTE: [Compiled row passes]
    Each vectorised pass (a chunk's ``vmap`` of VJPs, JVPs or Hessian-vector
    products, a block of samples' Jacobians) goes through
    :func:`pipeline.maths.compiled.run_pass`, keyed by the user's function
    and the shapes, dtype and device of ``x`` and of the chunk: ``"off"``
    runs it eagerly, as before; ``"on"`` and ``"auto"`` (once the eager
    seconds spent on that pass pay for compiling) run a ``torch.compile``d
    pure pass ``(x, basis) -> rows`` that also recomputes ``fn(x)``. The
    eager pass reuses the pullback recorded for the call (one forward pass
    per call). The engine's checks (the vmap spot check, forward against
    reverse mode) compare the compiled rows with plain autograd as they do
    the eager ones. Reverse-mode rows of a function that ends in a matrix
    product run eagerly from below it unless ``"on"`` is asked (NOTE: [Rows
    whose last operation is a matrix product] in :mod:`pipeline.maths.peel`):
    their largest product is gone, which no compiled pass of the whole
    function removes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.overrides import TorchFunctionMode

from pipeline.core.errors import JacpipeError, OutputTypeError, SampleShapeError
from pipeline.maths import checks
from pipeline.maths.compiled import check_compile, run_pass, spare_dynamo_import

METHODS = ("rev", "fwd")


class VmapFallbackWarning(UserWarning):
    """The function could not be vectorized; rows are computed one by one."""


class InputWriteError(JacpipeError, ValueError):
    """``fn`` writes into its input: no derivative of it is autograd's answer."""


INPUT_WRITE_MESSAGE = (
    "fn writes into its input x (an in-place operation such as t.mul_(2) on its argument); "
    "torch.autograd.functional.jacobian refuses such a function too. "
    "Clone it first: t = t.clone()"
)


def _fresh(x: Tensor) -> Tensor:
    """A copy of ``x`` for ``fn``: the caller's tensor is never handed to ``fn``.

    NOTE: [Functions that write into their input]
        ``torch.func.jvp`` and ``vmap`` let ``fn`` write into its argument: on
        a view of the caller's ``x`` each forward-mode pass then starts from
        the previous pass's values (``t.mul_(2)``: rows ``[10, 32, 96]``
        instead of ``[10, 16, 24]`` at chunk size 1) and the caller's tensor
        changes. Reverse mode and ``torch.autograd.functional.jacobian``
        refuse it ("a leaf Variable that requires grad is being used in an
        in-place operation"). Every mode therefore works on a copy and
        refuses with :class:`InputWriteError`: forward mode by the copy's
        version counter after each pass (free), reverse mode by one forward
        pass on a copy after autograd raised (only on that failure path).
    """
    return x.detach().clone()


def _check_untouched(t: Tensor, version: int) -> None:
    """Raise :class:`InputWriteError` if ``fn`` wrote into ``t`` (see :func:`_fresh`)."""
    if t._version != version:
        raise InputWriteError(INPUT_WRITE_MESSAGE)


def _refuse_input_writes(fn: Callable[[Tensor], Tensor], x: Tensor) -> None:
    """Raise :class:`InputWriteError` if ``fn`` writes into its argument, else return.

    One forward pass without autograd on a copy of ``x``; called only after a
    transform failed, to tell that failure's reason from any other.
    """
    probe = _fresh(x)
    before = probe._version
    try:
        with torch.no_grad():
            fn(probe)
    except Exception:  # noqa: BLE001 - fn fails for another reason: reported by the caller
        return
    _check_untouched(probe, before)


def _flat_fn(fn: Callable[[Tensor], Tensor], shape: torch.Size) -> Callable[[Tensor], Tensor]:
    """``fn`` of a flat ``x``, flat output; no reshape where one is flat already (under
    ``vjp`` each op is a few microseconds of a small call)."""
    def flat(t: Tensor) -> Tensor:
        y = fn(t if len(shape) == 1 else t.reshape(shape))
        return y if y.dim() == 1 else y.reshape(-1)

    return flat


def _chunks(start: int, stop: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    step = max(1, chunk_size or (stop - start) or 1)
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


def basis_rows(start: int, stop: int, size: int, like: Tensor) -> Tensor:
    """Rows ``[start, stop)`` of the ``size × size`` identity, dtype/device of ``like``."""
    if start == 0 and stop == size:  # one op instead of three (never kept between calls:
        # a function that writes into its input writes into forward mode's tangents)
        return torch.eye(size, dtype=like.dtype, device=like.device)
    basis = like.new_zeros(stop - start, size)
    basis.diagonal(offset=start).fill_(1)  # basis[k, start + k] = 1
    return basis


#: The largest identity (in entries) reverse mode keeps between calls: 16 MiB in
#: float32, 32 MiB in float64 (mlp 2000's 2000 x 2000).
KEEP_IDENTITY_NUMEL = 2**22
_KEPT = threading.local()


def _cotangents(start: int, stop: int, size: int, like: Tensor) -> Tensor:
    """Reverse mode's cotangents of rows ``[start, stop)`` (:func:`basis_rows`); the whole
    identity of a small ``size`` is kept between calls of this thread.

    NOTE: [A kept identity]
        Building the ``m x m`` identity of a one-chunk call cost as much as
        the vmap spot check (fresh pages and a fill: mlp 2000 0.4-0.8 ms
        against the check's 0.6 ms, mlp 1000 0.1-0.5 ms against 0.3 ms, a
        (30, 40) -> (30, 50) map 0.3 ms of 4-6 ms), and ``jacrev`` builds it
        on every call. Reverse mode reads its
        cotangents and ``fn``'s forward pass never sees them, so the identity
        up to :data:`KEEP_IDENTITY_NUMEL` entries is kept per thread (no
        thread's backward can write into another's) and handed out again
        only while its version counter says nothing wrote into it (a custom
        ``backward`` that scales its ``grad_output`` in place, under vmap
        too: tested); rows that share its memory (``fn`` the identity: the
        pullback returns the cotangents themselves) take it with them
        (:func:`_release_if_aliased`), so no two results share memory.
        Forward mode builds its tangents afresh: a function that writes into
        its input writes into them.
    """
    if start != 0 or stop != size or size * size > KEEP_IDENTITY_NUMEL:
        return basis_rows(start, stop, size, like)
    kept = getattr(_KEPT, "identity", None)
    if kept is not None:
        eye, version = kept
        if (eye.shape[0] == size and eye.dtype == like.dtype and eye.device == like.device
                and eye._version == version):
            return eye
    eye = basis_rows(0, size, size, like)
    _KEPT.identity = (eye, eye._version)
    return eye


def _release_if_aliased(rows: Tensor, basis: Tensor) -> None:
    """Stop keeping ``basis`` (NOTE: [A kept identity]) when ``rows`` share its memory."""
    kept = getattr(_KEPT, "identity", None)
    if kept is None or kept[0] is not basis:
        return
    try:
        shared = rows.untyped_storage().data_ptr() == basis.untyped_storage().data_ptr()
    except RuntimeError:  # no storage to compare (a backward's efficient zeros: sgn)
        shared = True  # cannot tell: not kept
    if shared:
        _KEPT.identity = None


# ---------------------------------------------------------------------------
# Jacobian, reverse mode
# ---------------------------------------------------------------------------


def iter_jacobian_rows(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    method: str = "rev",
    compile: str = "auto",
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_row, block)`` for rows ``[start, stop)`` of ``J``, chunk by chunk.

    Args:
        fn: function of ``x``; any input and output shape.
        x: the point; float32 or float64 (kept in the result).
        start, stop: flat output row range over ``fn(x).reshape(-1)``.
        chunk_size: rows (``rev``) or columns (``fwd``) per vectorised pass;
            ``None`` means all at once.
        method: ``"rev"`` (one VJP per row) or ``"fwd"`` (one JVP per column).
        compile: ``"auto"``, ``"on"`` or ``"off"``: ``torch.compile`` the
            vectorised passes (NOTE: [Compiled row passes]).

    Yields:
        ``(a, block)`` with ``block`` of shape ``(b - a, x.numel())``, in
        ``x``'s dtype whatever ``fn(x)``'s dtype.

    Raises:
        InputWriteError: ``fn`` writes into its argument (see NOTE:
            [Functions that write into their input]); ``x`` is never changed.
        ValueError: an unknown method or a row range outside ``fn(x)``.
    """
    return _jacobian_blocks(fn, x, start, stop, chunk_size=chunk_size, method=method,
                            compile=compile)


def _jacobian_blocks(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None,
    method: str,
    sample: tuple[int, int] | None = None,
    vectorise: bool = True,
    compile: str = "auto",
) -> Iterator[tuple[int, Tensor]]:
    """:func:`iter_jacobian_rows`; ``sample = (s, m)``: ``fn(x)`` must have ``m`` entries.

    ``vectorise=False``: rows one ``autograd.grad`` at a time (a batching rule was found wrong).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if torch.is_inference_mode_enabled():  # autograd records nothing there
        yield from _outside_inference_mode(_jacobian_blocks(
            fn, x, start, stop, chunk_size=chunk_size, method=method, sample=sample,
            vectorise=vectorise, compile=compile))
        return
    owner, fn = fn, strict_outputs(fn)
    if not (vectorise and checks.vectorised()):  # the run's spot check found a wrong batching rule
        yield from _iter_rows_loop(fn, x, start, stop, chunk_size=chunk_size, reason=None,
                                   sample=sample)
        return
    if method == "fwd":
        try:
            blocks = list(_iter_rows_fwd(fn, x, start, stop, chunk_size=chunk_size, sample=sample,
                                         owner=owner, compile=compile))
        except RuntimeError as exc:
            _refuse_input_writes(fn, x)
            yield from _iter_rows_loop(
                fn, x, start, stop, chunk_size=chunk_size, reason=exc, sample=sample
            )
            return
        if blocks and checks.forward_rejected(
                lambda: _jacobian_forward_gap(fn, x, *blocks[0]), "Jacobian rows"):
            method = "rev"
        else:
            yield from blocks
            return
    try:
        x_flat, y, pullback, peeled = _recorded(fn, x, peeling=check_compile(compile) != "on")
    except RuntimeError as exc:
        _refuse_input_writes(fn, x)
        yield from _iter_rows_loop(
            fn, x, start, stop, chunk_size=chunk_size, reason=exc, sample=sample
        )
        return
    _observe(y)
    _check_range(start, stop, y.numel(), sample)
    vectorized, shaped = torch.func.vmap(pullback), (-1, *y.shape)

    def eager(basis: Tensor) -> Tensor:
        return vectorized(basis.reshape(shaped)).reshape(basis.shape[0], -1)

    for a, b in _chunks(start, stop, chunk_size):
        basis, rows = None, _peeled_chunk(peeled, a, b)
        try:
            if rows is None:
                peeled = None
                basis = _cotangents(a, b, y.numel(), y)
                rows = run_pass(owner, ("rows-rev", x.shape, x.dtype, x.device, basis.shape),
                                lambda: _vjp_rows(fn, x.shape), x_flat, basis,
                                compile=compile, eager=lambda basis=basis: eager(basis))
        except RuntimeError as exc:
            yield from _iter_rows_loop(
                fn, x, a, stop, chunk_size=chunk_size, reason=exc, sample=sample
            )
            return
        if a == start and _spot_rejected(lambda e: pullback(e.reshape(y.shape)).reshape(-1),
                                         rows, a, y, "Jacobian rows"):
            yield from _iter_rows_loop(fn, x, a, stop, chunk_size=chunk_size, reason=None,
                                       sample=sample)
            return
        if basis is not None:
            _release_if_aliased(rows, basis)
        yield a, rows.to(x.dtype)


def _peel_agrees(y: Tensor, start: Any) -> bool:
    """Whether autograd's own backward from ``y`` to the peel's edge, for one random
    combination ``c`` of all rows, gives the peel's combined cotangents there.

    NOTE: [A peel checked by the graph it skips]
        The peel reads the graph above its edge but cannot see the hooks on
        it (a tensor hook on an intermediate, a node's pre-hook, a legacy
        module backward hook): torch does not list them. So once per call
        autograd runs that part itself, hooks included, for ``c`` uniform in
        ``[-1, 1)`` over every row: ``torch.autograd.grad(y, edge, c)`` (one
        matrix-vector product through the last layer, not a batch of them)
        against ``peel.combine(c)``; unequal beyond rounding (relative to the
        bound ``|c| |cotangents|_F``, the spot check's tolerance), the call
        takes the identity's rows. The vmap spot check then compares the rows
        with one plain backward of the whole graph, as before, but only on a
        call's first chunk and on up to 32 of its rows; this check covers
        every row's cotangent at the edge.
    """
    c, c_norm = _probe_weights(y.numel(), y.dtype, y.device)
    try:
        probe = _grad_of(y, start.edge)(c.reshape(y.shape).clone())  # (a hook may write)
        ours = start.combine(c)
    except RuntimeError:  # (not expected) no verdict: the identity's rows
        return False
    if probe is None or probe.numel() != ours.numel():
        return False
    diff = float(torch.linalg.vector_norm(probe.reshape(-1) - ours.reshape(-1)))
    return diff <= checks.tolerance(ours.dtype, checks.SPOT_RTOL) * c_norm * start.bound


@functools.lru_cache(maxsize=16)
def _probe_weights(m: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, float]:
    """The peel check's ``c`` for ``m`` rows (uniform in ``[-1, 1)``, drawn once) and its
    norm; read, never written."""
    c = checks.uniform((m,), torch.empty(0, dtype=dtype, device=device), 11, m)
    return c, float(torch.linalg.vector_norm(c.double()))


def _peeled_chunk(peeled: Callable[[int, int], Tensor] | None, a: int, b: int
                  ) -> Tensor | None:
    """Rows ``[a, b)`` by ``peeled`` (see :func:`_recorded`), or None: the identity's."""
    if peeled is None:
        return None
    try:
        return peeled(a, b)
    except RuntimeError:  # (not expected) the identity's rows give the answer
        return None


def _outside_inference_mode(blocks: Iterator[tuple[int, Tensor]]
                            ) -> Iterator[tuple[int, Tensor]]:
    """``blocks``, each computed with ``torch.inference_mode`` off (a caller inside it
    gets rows as ``jacrev`` gives them there: reverse mode records ``fn`` by autograd)."""
    while True:
        with torch.inference_mode(False):
            item = next(blocks, None)
        if item is None:
            return
        yield item


def _recorded(fn: Callable[[Tensor], Tensor], x: Tensor, *, peeling: bool = False
              ) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor],
                         Callable[[int, int], Tensor] | None]:
    """``(x_flat, fn(x), pullback, peeled)``: ``fn``'s forward pass at a copy of ``x``,
    recorded once by plain autograd; ``pullback(c)`` is ``Jᵀ c`` in ``x``'s shape;
    ``peeled(a, b)`` (``peeling`` asked and ``fn`` ending in a matrix product, else
    ``None``) is rows ``[a, b)`` of ``J`` from one node below ``y`` (NOTE: [Rows whose
    last operation is a matrix product] in :mod:`pipeline.maths.peel`), ``None`` for a
    chunk it cannot do.

    NOTE: [Rows by plain autograd under vmap]
        ``pullback`` is ``torch.autograd.grad`` of the recorded graph; vmapped
        over a chunk's basis rows it runs the same batched backward formulas
        as ``torch.func.vjp``'s pullback (rows equal bitwise: tested against
        ``jacrev``), without ``vjp``'s grad level around every forward op and
        without the graph ``vjp``'s pullback records of its own backward
        (``create_graph`` is on there wherever grad mode is). Measured on the
        loaded 2-core machine, interleaved: mlp 200 1.25 -> 1.06 ms, a (30, 40)
        -> (30, 50) map 3.37 -> 3.28 ms (``jacrev``: 1.27 and 3.55 ms). The
        vmap spot check's unbatched pullback is one plain ``autograd.grad`` of
        the same graph, not a batching rule. ``fn`` runs at ``x``'s own shape,
        as in ``jacrev``: flattening ``x`` and ``fn(x)`` inside the recorded
        pass cost 13% of the (30, 40) map's rows. A function whose output does
        not depend on ``x`` (or not through autograd) has zero rows, as
        ``vjp``'s pullback gives. The compiled pass gets ``x_flat``, a view of
        the copy that records nothing.
    """
    x_in = _fresh(x)
    xg = x_in.detach().requires_grad_(True)
    with torch.enable_grad():
        y = fn(xg)
    grad = _grad_of(y, xg)

    def pullback(c: Tensor) -> Tensor:
        if not y.requires_grad:
            return torch.zeros_like(x_in)
        g = grad(c)
        return torch.zeros_like(x_in) if g is None else g

    return x_in.reshape(-1), y, pullback, (_peeled_rows(y, xg) if peeling else None)


def _peeled_rows(y: Tensor, xg: Tensor) -> Callable[[int, int], Tensor] | None:
    """Rows ``[a, b)`` of ``J`` (flat, ``(b - a, n)``) pulled back from below ``y``'s last
    matrix product (:func:`pipeline.maths.peel.peel`), or ``None``."""
    from pipeline.maths.peel import peel

    start = peel(y, xg) if y.requires_grad else None
    if start is None or not _peel_agrees(y, start):
        return None
    grad = _grad_of(start.edge, xg)
    zeros = torch.zeros_like(xg)

    def one(c: Tensor) -> Tensor:
        g = grad(c)
        return zeros if g is None else g

    def rows(a: int, b: int) -> Tensor:
        cot = start.cotangents(a, b)
        return torch.func.vmap(one)(cot).reshape(b - a, -1)

    return rows


def _grad_of(y: Tensor | GradientEdge, xg: Tensor | GradientEdge
             ) -> Callable[[Tensor], Tensor | None]:
    """``c -> Jᵀ c`` (None: ``y`` does not depend on ``xg``), the graph kept for the next;
    ``y`` may be an edge inside the graph (NOTE: [Rows whose last operation is a matrix
    product] in :mod:`pipeline.maths.peel`).

    NOTE: [Backward passes without autograd.grad's wrapper]
        ``torch.autograd.grad``'s Python wrapper (argument normalisation, a
        shape check per cotangent through ``sym_eq``, the context it stashes
        for device threads) cost about 60 us a call on the loaded 2-core
        machine, against 30 us for the whole backward of a (3, 4) -> (3, 5)
        map: a third of a small call's vmap spot check. Where the engine's
        own entry point is there, ``y`` is a plain tensor (no
        ``__torch_function__`` override to honour) and no forward-mode level
        is active (jacpipe's first backward under forward mode loads torch's
        jvp decompositions: :func:`pipeline.core.imports.defer_jvp_decompositions`),
        the backward goes to the engine directly; the cotangents are built
        here in ``y``'s shape and dtype, so the wrapper's checks have nothing
        to find. Elsewhere ``torch.autograd.grad`` as before.
    """
    from torch.autograd import forward_ad

    run = getattr(getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward",
                  None)
    if run is None or type(y) not in (Tensor, GradientEdge) or type(xg) not in (Tensor,
                                                                              GradientEdge):
        return lambda c: torch.autograd.grad(y, xg, c, retain_graph=True, allow_unused=True)[0]
    outputs, inputs = (y,), (xg,)

    def grad(c: Tensor) -> Tensor | None:
        if getattr(forward_ad, "_current_level", 0) >= 0:  # (unknown: the wrapper)
            return torch.autograd.grad(y, xg, c, retain_graph=True, allow_unused=True)[0]
        # (outputs, cotangents, keep_graph, create_graph, inputs, allow_unreachable,
        #  accumulate_grad)
        return run(outputs, (c,), True, False, inputs, True, False)[0]

    return grad


_OUTPUTS: contextvars.ContextVar[list[tuple[Any, ...]] | None] = contextvars.ContextVar(
    "jacpipe_outputs", default=None)


@contextlib.contextmanager
def observed_outputs() -> Iterator[list[tuple[Any, ...]]]:
    """``(shape, dtype)`` of each ``fn(x)`` reverse-mode Jacobian rows record inside the block.

    The front door's remembered calls read their output's shape and dtype from
    the pass that computes the rows instead of calling ``fn`` once more
    (NOTE: [Repeated calls of one function] in :mod:`pipeline.runner.front`).
    """
    seen: list[tuple[Any, ...]] = []
    token = _OUTPUTS.set(seen)
    try:
        yield seen
    finally:
        _OUTPUTS.reset(token)


def _observe(y: Tensor) -> None:
    seen = _OUTPUTS.get()
    if seen is not None:
        seen.append((tuple(y.shape), y.dtype))


def _vjp_rows(fn: Callable[[Tensor], Tensor], shape: torch.Size) -> Callable:
    """The pure reverse pass ``(x_flat, basis) -> basis @ J`` (NOTE: [Compiled row passes])."""
    f = _flat_fn(fn, shape)

    def rows(x_flat: Tensor, basis: Tensor) -> Tensor:
        _, pullback = torch.func.vjp(f, x_flat)
        return torch.func.vmap(pullback)(basis)[0]

    return rows


def _jvp_columns(fn: Callable[[Tensor], Tensor], shape: torch.Size) -> Callable:
    """The pure forward pass ``(x_flat, basis) -> (J @ basis.T).T`` (one JVP per row of basis)."""
    f = _flat_fn(fn, shape)

    def columns(x_flat: Tensor, basis: Tensor) -> Tensor:
        return torch.func.vmap(lambda v: torch.func.jvp(f, (x_flat,), (v,))[1])(basis)

    return columns


def _hessian_pass(f: Callable[[Tensor], Tensor], method: str) -> Callable:
    """The pure Hessian pass ``(x_flat, basis) -> basis @ H`` by ``method`` (rev: ``vjp`` of
    ``grad``, fwd: ``jvp`` of ``grad``), ``f`` a function of flat ``x``."""
    grad = torch.func.grad(lambda t: f(t).reshape(()))

    def rows(x_flat: Tensor, basis: Tensor) -> Tensor:
        if method == "fwd":
            return torch.func.vmap(lambda v: torch.func.jvp(grad, (x_flat,), (v,))[1])(basis)
        _, pullback = torch.func.vjp(grad, x_flat)
        return torch.func.vmap(lambda v: pullback(v)[0])(basis)

    return rows


def _iter_rows_loop(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None,
    reason: BaseException | None,
    sample: tuple[int, int] | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Rows one ``autograd.grad`` at a time: the fallback for non-vectorisable functions.

    ``reason``: why vmap failed (warned); None when the caller has said why.
    """
    if reason is not None:
        _report_unvectorised(reason, "Jacobian rows")
    xg = _fresh(x).requires_grad_(True)
    y = _forward_with_graph(fn, xg).reshape(-1)
    _check_range(start, stop, y.numel(), sample)
    for a, b in _chunks(start, stop, chunk_size):
        block = x.new_empty(b - a, x.numel())
        for i in range(a, b):
            (g,) = torch.autograd.grad(y[i], xg, retain_graph=True, allow_unused=True)
            block[i - a] = 0 if g is None else g.reshape(-1)
        yield a, block


def _forward_with_graph(fn: Callable[[Tensor], Tensor], xg: Tensor) -> Tensor:
    """``fn(xg)`` recorded by autograd; a write into ``xg`` is an :class:`InputWriteError`."""
    try:
        with torch.enable_grad():
            return fn(xg)
    except RuntimeError:
        _refuse_input_writes(fn, xg)
        raise


def _iter_rows_fwd(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None,
    sample: tuple[int, int] | None = None,
    owner: Callable[[Tensor], Tensor],
    compile: str,
) -> Iterator[tuple[int, Tensor]]:
    x_flat = _fresh(x).reshape(-1)
    version = x_flat._version
    n = x_flat.numel()
    f = _flat_fn(fn, x.shape)

    def columns(v: Tensor) -> Tensor:
        return torch.func.jvp(f, (x_flat,), (v,))[1]

    vectorized = torch.func.vmap(columns)
    out = None
    for a, b in _chunks(0, n, chunk_size):
        # (b - a, m): J[:, a:b].T, in x's dtype whatever fn(x)'s dtype (as rev mode)
        basis = basis_rows(a, b, n, x_flat)
        tangents = run_pass(owner, ("rows-fwd", x.shape, x.dtype, x.device, basis.shape),
                            lambda: _jvp_columns(fn, x.shape), x_flat, basis, compile=compile,
                            eager=lambda basis=basis: _constants_left_out(
                                owner, ("rows-fwd", x.shape, x.dtype, x.device, basis.shape),
                                vectorized, basis)).to(x_flat.dtype)
        _check_untouched(x_flat, version)
        if a == 0 and b == n:  # one pass: all rows as a view, no copy (as jacfwd)
            m = tangents.shape[1]
            _check_range(start, stop, m, sample)
            rows = tangents[:, start:stop].T
            if stop > start:  # a shard's slice is copied: the view would keep all m rows
                yield start, rows if stop - start == m else rows.clone()
            return
        if out is None:
            # m comes from the first pass: no separate forward pass (it reads
            # every weight once more, ~15% of a tall Jacobian's time).
            _check_range(start, stop, tangents.shape[1], sample)
            if stop <= start:
                return
            out = x_flat.new_empty(stop - start, n)
        out[:, a:b] = tangents[:, start:stop].T
    if out is None:  # no input columns at all
        with torch.no_grad():
            _check_range(start, stop, f(x_flat).numel(), sample)
        out = x_flat.new_empty(stop - start, 0)
    if stop > start:
        yield start, out


#: Per function (weakly) and pass key: whether its forward-mode pass had a constant
#: product to take (NOTE: [Constant weights in forward mode]); False: run plainly.
_CONSTANT_PRODUCTS: weakref.WeakKeyDictionary[Any, dict[Any, bool]] = (
    weakref.WeakKeyDictionary())


def _constants_left_out(owner: Any, key: Any, pass_: Callable[[Tensor], Tensor],
                        basis: Tensor) -> Tensor:
    """``pass_(basis)``, a forward-mode pass, without constant matrices' zero tangents
    (NOTE: [Constant weights in forward mode] in :mod:`pipeline.maths.tangents`)."""
    from pipeline.maths.tangents import constant_products

    try:
        seen = _CONSTANT_PRODUCTS.setdefault(owner, {})
    except TypeError:  # not weakly referenceable: decided on every call
        seen = {}
    if seen.get(key) is False:
        return pass_(basis)
    try:
        with constant_products() as mode:
            out = pass_(basis)
    except Exception:  # noqa: BLE001 - the pass as PyTorch runs it gives the answer (or error)
        seen[key] = False
        return pass_(basis)
    seen[key] = mode.hits > 0
    return out


def jacobian_rows(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    method: str = "rev",
    compile: str = "auto",
) -> Tensor:
    """Rows ``[start, stop)`` of ``d fn(x).flatten() / d x.flatten()``.

    Args:
        fn: function of ``x``; any input and output shape.
        x: the point; float32 or float64 (kept in the result).
        start, stop: flat output row range; an empty range gives ``(0, n)``.
        chunk_size: rows (``rev``) or columns (``fwd``) per vectorised pass.
        method: ``"rev"`` or ``"fwd"``.
        compile: ``"auto"``, ``"on"`` or ``"off"`` (NOTE: [Compiled row passes]).

    Returns:
        A ``(stop - start, x.numel())`` tensor. Like ``torch.func.jacrev`` it
        may be column-major (``w @ x`` layers give transposed batched
        products); call ``.contiguous()`` where rows must be contiguous.
    """
    blocks = iter_jacobian_rows(fn, x, start, stop, chunk_size=chunk_size, method=method,
                                compile=compile)
    return _assemble(blocks, start, stop, x.new_empty(0, x.numel()))


def _assemble(
    blocks: Iterator[tuple[int, Tensor]], start: int, stop: int, empty: Tensor
) -> Tensor:
    """Rows ``[start, stop)`` from ``(first_row, block)`` chunks, copying only if several."""
    out = None
    for a, block in blocks:
        if a == start and block.shape[0] == stop - start:
            return block  # one chunk: no copy
        if out is None:
            out = _empty_like_layout(block, stop - start)
        out[a - start : a - start + block.shape[0]] = block
    return out if out is not None else empty


def _empty_like_layout(block: Tensor, rows: int) -> Tensor:
    """An empty ``(rows, n)`` tensor with ``block``'s memory order.

    Copying column-major blocks into a column-major result is a plain strided
    copy; ``torch.cat`` would transpose every block (about 3x slower).
    """
    if block.dim() == 2 and block.shape[0] > 1 and block.stride(0) == 1:
        return block.new_empty(block.shape[1], rows).T
    return block.new_empty(rows, block.shape[1])


class _IntermediateCounter(TorchFunctionMode):
    """Counts the elements of every differentiable tensor a forward pass creates."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        del types
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.requires_grad:
                self.total += t.numel()
        return out


def intermediate_numel(
    fn: Callable[[Tensor], Tensor], x: Tensor, *, warm_up: bool = True
) -> int:
    """Elements of the differentiable intermediates of one forward pass of ``fn`` at ``x``.

    NOTE: [Memory of one basis vector]
        A vectorised pass over ``c`` basis vectors carries ``c`` cotangents
        (``rev``) or tangents (``fwd``) of every intermediate, so its memory is
        ``c`` times this count, plus the basis and result rows. Tensors autograd
        *saves* (weights, activations) are shared by all ``c`` and are already
        in the process's measured baseline: counting them per row, as
        ``saved_tensors_hooks`` would, makes a 40,000-wide MLP cost 160 MiB
        "per row" instead of 0.6 MiB. The count is a sum over the whole
        graph, an upper bound of what is alive at once.

    With ``warm_up`` it also runs a tiny vectorised VJP (of a fixed function,
    never ``fn``): torch.func's one-time setup (~70 MiB of RSS, measured)
    then happens here, before a worker measures the baseline its chunks are
    budgeted against, not inside the first chunk.
    """
    xg = x.detach().reshape(-1).clone().requires_grad_(True)
    counter = _IntermediateCounter()
    try:
        with torch.enable_grad(), counter:
            fn(xg.reshape(x.shape))
    except RuntimeError:
        _refuse_input_writes(fn, x)  # autograd refuses a write into a leaf: say why
        raise
    if warm_up:
        w = x.new_ones(8, 8)
        for _ in iter_jacobian_rows(lambda t: w @ torch.tanh(w @ t), x.new_ones(8), 0, 1):
            pass
    return counter.total


def _check_range(start: int, stop: int, m: int, sample: tuple[int, int] | None = None) -> None:
    """Check a row range against ``m`` outputs; ``sample = (s, m_0)``: also ``m == m_0``.

    Raises:
        SampleShapeError: sample ``s`` has ``m != m_0`` outputs.
        ValueError: the range is outside ``[0, m)``.
    """
    if sample is not None and m != sample[1]:
        _wrong_sample_size(sample[0], m, sample[1])
    if not 0 <= start <= stop <= m:
        raise ValueError(f"row range [{start}, {stop}) outside [0, {m})")


def _wrong_sample_size(s: int | str, got: int, m: int) -> None:
    raise SampleShapeError(
        f"fn(xs[{s}]) has {got} entries but fn(xs[0]) has {m}: a batched job's fn must "
        "give every sample an output of the same shape (pad it, or use one job per size)"
    )


# ---------------------------------------------------------------------------
# Hessian
# ---------------------------------------------------------------------------


#: What ``method="auto"`` means for Hessians (see NOTE: [Hessian rows: which mode]).
HESSIAN_AUTO = "rev"


def iter_hessian_rows(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    method: str = "rev",
    compile: str = "auto",
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_row, block)`` for rows ``[start, stop)`` of the Hessian of scalar ``fn``.

    NOTE: [Hessian rows: which mode]
        ``rev`` is reverse-over-reverse: the gradient's graph is recorded once
        (one ``vjp`` of ``grad``) and its pullback is vmapped over basis rows,
        so a chunk of ``c`` rows costs one batched backward-of-backward pass.
        ``fwd`` is forward-over-reverse: ``H e_i`` by a JVP of the gradient,
        which is row ``i`` because ``H`` is symmetric; each chunk re-runs the
        gradient with ``c`` batched tangents. Both cost about the same flops
        per row; measured on the n = 4000 dense benchmark
        (``benchmarks/batched_hessian.py``), ``rev`` is the faster at every
        chunk size up to 1024 rows, so ``auto`` means ``rev``.

    Args:
        fn: scalar function of ``x`` (any input shape).
        x: the point; float32 or float64 (kept in the result).
        start, stop: flat row range over ``x.reshape(-1)``.
        chunk_size: rows per vectorised pass (both modes); ``None`` = all at once.
        method: ``"rev"``, ``"fwd"`` or ``"auto"`` (= :data:`HESSIAN_AUTO`).
        compile: ``"auto"``, ``"on"`` or ``"off"`` (NOTE: [Compiled row passes]).

    Functions torch.func cannot transform (an old-style ``autograd.Function``)
    fall back, with one :class:`VmapFallbackWarning`, to one double backward
    per row (:func:`hessian_vector_products`), as
    ``torch.autograd.functional.hessian`` computes them.

    Yields:
        ``(a, block)`` with ``block`` of shape ``(b - a, x.numel())``.

    Raises:
        InputWriteError: ``fn`` writes into its argument.
        ValueError: an unknown method or a row range outside ``x``.
    """
    if method == "auto":
        method = HESSIAN_AUTO
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} or 'auto', got {method!r}")
    spare_dynamo_import()  # before the gradient's first backward (reverse-over-reverse)
    owner, fn = fn, strict_outputs(fn)
    x_flat = _fresh(x).reshape(-1)
    version = x_flat._version
    n = x_flat.numel()
    _check_range(start, stop, n)
    if stop <= start:  # chunked vmap over zero rows raises
        return
    if not checks.vectorised():  # the run's spot check found a wrong batching rule
        yield from _iter_hessian_loop(fn, x, start, stop, chunk_size=chunk_size, reason=None)
        return
    f = _flat_fn(fn, x.shape)
    grad = torch.func.grad(lambda t: f(t).reshape(()))
    pullback = None  # reverse mode's: also the spot check's unbatched rows
    try:
        if method == "rev":
            _, pullback = torch.func.vjp(grad, x_flat)
            rows_of = torch.func.vmap(lambda v: pullback(v)[0])
        else:
            rows_of = torch.func.vmap(lambda v: torch.func.jvp(grad, (x_flat,), (v,))[1])
    except RuntimeError as exc:
        _refuse_input_writes(fn, x)
        yield from _iter_hessian_loop(fn, x, start, stop, chunk_size=chunk_size, reason=exc)
        return
    for a, b in _chunks(start, stop, chunk_size):
        basis = basis_rows(a, b, n, x_flat)
        try:
            rows = run_pass(owner, (f"hessian-{method}", x.shape, x.dtype, x.device, basis.shape),
                            lambda method=method: _hessian_pass(f, method), x_flat, basis,
                            compile=compile,
                            eager=lambda basis=basis, rows_of=rows_of: rows_of(basis))
        except RuntimeError as exc:
            _refuse_input_writes(fn, x)
            yield from _iter_hessian_loop(fn, x, a, stop, chunk_size=chunk_size, reason=exc)
            return
        _check_untouched(x_flat, version)
        if a == start:
            checked = _checked_hessian_rows(fn, x, grad, a, rows, pullback)
            if checked is None:  # vmap is wrong here: one row at a time
                yield from _iter_hessian_loop(fn, x, a, stop, chunk_size=chunk_size, reason=None)
                return
            rows = checked[0]
            if checked[1] is not None:  # forward mode was rejected: reverse for the rest
                rows_of, method = checked[1], "rev"
        yield a, rows.to(x.dtype)


def _checked_hessian_rows(
    fn: Callable[[Tensor], Tensor], x: Tensor, grad: Callable[[Tensor], Tensor], a: int,
    rows: Tensor, pullback: Callable[[Tensor], tuple[Tensor, ...]] | None,
) -> tuple[Tensor, Callable[[Tensor], Tensor] | None] | None:
    """A call's first chunk of Hessian rows after the checks: ``(rows, rows_of the rest)``.

    ``rows_of`` None: the caller's own goes on.

    Forward-over-reverse rows (``pullback`` None) against reverse-over-reverse
    autograd: rejected, they are computed again by reverse mode, which the
    rest of the call then uses. Reverse-mode rows: one random row without
    vmap; None when it differs (the caller goes one row at a time).
    """
    x_flat = _fresh(x).reshape(-1)
    rows_of = None  # the caller's
    if pullback is None:
        if not checks.forward_rejected(lambda: _hessian_forward_gap(fn, x, a, rows),
                                       "Hessian rows"):
            return rows, None
        _, pullback = torch.func.vjp(grad, x_flat)
        rows_of = torch.func.vmap(lambda v: pullback(v)[0])
        rows = rows_of(basis_rows(a, a + rows.shape[0], x_flat.numel(), x_flat))
    if _spot_rejected(lambda e: pullback(e)[0], rows, a, x_flat, "Hessian rows"):
        return None
    return rows, rows_of


def _iter_hessian_loop(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None,
    reason: BaseException | None,
) -> Iterator[tuple[int, Tensor]]:
    """Hessian rows by double backward, one ``autograd.grad`` per row.

    The fallback for functions torch.func cannot transform (an old-style
    ``autograd.Function``, ``.item()`` under ``vmap``), as
    ``torch.autograd.functional.hessian`` computes them: the gradient is
    recorded with ``create_graph`` once, and row ``i`` is ``d g_i / d x``.
    ``reason``: why vmap failed (warned); None when the caller has said why.
    """
    if reason is not None:
        _report_unvectorised(reason, "Hessian rows")
    grad_rows = hessian_vector_products(fn, x)
    for a, b in _chunks(start, stop, chunk_size):
        yield a, grad_rows(basis_rows(a, b, x.numel(), x))


def hessian_vector_products(
    fn: Callable[[Tensor], Tensor], x: Tensor
) -> Callable[[Tensor], Tensor]:
    """``V -> V @ H`` (rows ``H v``) by reverse-over-reverse ``torch.autograd``, no torch.func.

    The gradient's graph is recorded once (``create_graph``); each row of
    ``V`` then costs one backward pass of it. ``H`` is symmetric, so row ``k``
    of the result is ``H V[k]``. Works for every function
    ``torch.autograd.functional.hessian`` handles.

    Args:
        fn: scalar function of ``x``.
        x: the point (any shape; ``V`` has ``x.numel()`` columns).

    Returns:
        A function of ``V`` ``(k, x.numel())`` returning ``(k, x.numel())`` in
        ``x``'s dtype.

    Raises:
        InputWriteError: ``fn`` writes into its argument.
        ValueError: ``fn(x)`` is not a scalar.
    """
    xg = _fresh(x).requires_grad_(True)
    y = _forward_with_graph(fn, xg)
    if y.numel() != 1:
        raise ValueError(f"a Hessian needs a scalar fn(x), got shape {tuple(y.shape)}")
    g = None
    if y.requires_grad:
        with torch.enable_grad():
            (g,) = torch.autograd.grad(y.reshape(()), xg, create_graph=True, allow_unused=True)
    g = g.reshape(-1) if g is not None and g.requires_grad else None  # None: H = 0

    def products(vs: Tensor) -> Tensor:
        out = x.new_zeros(vs.shape[0], x.numel())
        if g is None:
            return out
        for k in range(vs.shape[0]):
            (h,) = torch.autograd.grad(g, xg, vs[k].to(g.dtype), retain_graph=True,
                                       allow_unused=True)
            if h is not None:
                out[k] = h.reshape(-1)
        return out

    return products


def hessian_rows(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    method: str = "rev",
    compile: str = "auto",
) -> Tensor:
    """Rows ``[start, stop)`` of the Hessian of scalar ``fn`` at ``x`` (flat indices).

    Args:
        fn, x, start, stop, chunk_size, method, compile: as :func:`iter_hessian_rows`.

    Returns:
        A ``(stop - start, x.numel())`` tensor.
    """
    blocks = iter_hessian_rows(fn, x, start, stop, chunk_size=chunk_size, method=method,
                               compile=compile)
    return _assemble(blocks, start, stop, x.new_empty(0, x.numel()))


# ---------------------------------------------------------------------------
# Per-sample (batched) Jacobians
# ---------------------------------------------------------------------------


def iter_batched_rows(
    fn: Callable[[Tensor], Tensor],
    xs: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    method: str = "rev",
    m: int | None = None,
    compile: str = "auto",
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_row, block)`` for rows ``[start, stop)`` of the per-sample Jacobians.

    Row ``r`` is row ``r % m`` of the Jacobian of ``fn`` at sample ``r // m``
    (``m`` outputs per sample); never the ``B²`` cross terms.

    NOTE: [Per-sample rows: samples and rows in one pass]
        Whole samples are vectorised together with their rows: ``vmap`` over
        samples of ``m`` VJPs (``rev``) or ``n`` JVPs (``fwd``) per sample
        (NOTE: [Per-sample Jacobians without jacrev and jacfwd]), so one
        pass over ``s`` samples carries ``s * m`` cotangents (``rev``) or
        ``s * n`` tangents (``fwd``). ``chunk_size`` counts those
        basis vectors, like the rows / columns of :func:`iter_jacobian_rows`
        and the worker's memory budget, and is rounded down to whole samples.
        A shard boundary may cut a sample: its partial rows, and every sample
        whose rows alone exceed one chunk, go through
        :func:`iter_jacobian_rows` on that sample, chunked the same way.

    Args:
        fn: maps one sample ``xs[b]`` to any output shape (``m`` entries).
        xs: the batch ``(B, *in_shape)``; float32 or float64.
        start, stop: row range over ``(sample, row)`` flattened as ``b * m + i``.
        chunk_size: basis vectors per vectorised pass; ``None`` = all at once.
        method: ``"rev"`` or ``"fwd"``.
        compile: ``"auto"``, ``"on"`` or ``"off"`` (NOTE: [Compiled row passes]).

    Yields:
        ``(a, block)`` with ``block`` of shape ``(rows, xs[0].numel())``.

    Raises:
        SampleShapeError: a sample's output has another number of entries
            than ``fn(xs[0])``; checked as each sample is computed, so rows are
            never silently truncated.
        InputWriteError: ``fn`` writes into its argument; ``xs`` is never changed.
        ValueError: an unknown method or a row range outside ``B * m``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    owner, fn = fn, strict_outputs(fn)
    batch = xs.shape[0]
    flat = _fresh(xs).reshape(batch, -1)  # fn never sees the caller's batch
    version = flat._version
    n = flat.shape[1]
    # fn on samples of their own shape: jac*(fn) of one sample is out_shape + in_shape,
    # which flattens to its (m, n) rows for free; a reshaping wrapper around fn
    # adds four batched ops to every pass.
    samples = flat.view(xs.shape)
    vectorized = _sample_pass(owner, fn, method, compile)
    vectorise = True
    if m is None:  # the caller knows it (the worker's shapes): spare a forward pass
        m, block, method = _outputs_per_sample(
            fn, method, vectorized, samples, flat, version,
            stop if start == 0 and chunk_size is None and checks.vectorised() else 0)
        if block is not None:  # the whole batch, computed (and checked) while learning m
            yield 0, block
            return
        vectorise = method in METHODS  # "loop": vmap was found wrong here
        method = method if vectorise else "rev"
    _check_untouched(flat, version)
    _check_range(start, stop, m * batch)
    if stop <= start:
        return

    def one_sample(s: int, r0: int, r1: int, vectorise: bool = vectorise
                   ) -> Iterator[tuple[int, Tensor]]:
        blocks = _jacobian_blocks(
            fn, flat[s].reshape(xs.shape[1:]), r0, r1, chunk_size=chunk_size, method=method,
            sample=(s, m), vectorise=vectorise, compile=compile,
        )
        for a, block in blocks:
            yield s * m + a, block

    per_sample = n if method == "fwd" else m
    step = (chunk_size // per_sample) if chunk_size else batch
    step = step if vectorise and checks.vectorised() else 0  # one sample, one row at a time
    first, last = start // m, (stop - 1) // m + 1
    whole_a = first if start % m == 0 else first + 1  # whole samples [whole_a, whole_b)
    whole_b = last if stop % m == 0 else last - 1
    if step < 1 or whole_a >= whole_b:
        for s in range(first, last):
            yield from one_sample(s, max(start - s * m, 0), min(stop - s * m, m))
        return
    if whole_a > first:
        yield from one_sample(first, start - first * m, min(stop - first * m, m))
    for s0 in range(whole_a, whole_b, step):
        block, method, vectorise = _sample_block(
            fn, method, samples, flat, version, s0, min(s0 + step, whole_b), m,
            vectorized=_sample_pass(owner, fn, method, compile))
        if block is None:  # vmap failed, or is wrong here: the samples left one by one
            for s in range(s0, whole_b):
                yield from one_sample(s, 0, m, vectorise=vectorise)
            break
        yield s0 * m, block
    if whole_b < last:
        yield from one_sample(whole_b, 0, stop - whole_b * m)


def _sample_block(fn: Callable[[Tensor], Tensor], method: str, samples: Tensor, flat: Tensor,
                  version: int, s0: int, s1: int, m: int, *,
                  vectorized: Callable[[Tensor], Tensor]) -> tuple[Tensor | None, str, bool]:
    """Rows of whole samples ``[s0, s1)`` in one vectorised, checked pass (``vectorized``).

    Returns ``(rows, method, vectorise)``: ``rows`` None when vmap failed
    (``vectorise`` True: each sample may still vectorise over its rows) or
    is wrong here (False: one ``autograd.grad`` per row); ``method``: the
    one the call goes on with (:func:`_checked_samples`).
    """
    n = flat.shape[1]
    try:
        block = vectorized(samples[s0:s1])
    except RuntimeError as exc:
        _refuse_input_writes(fn, samples[s0])
        checks.report(
            f"fn cannot be vectorised over samples ({str(exc).splitlines()[0][:160]}); "
            "computing the per-sample Jacobians one sample at a time",
            VmapFallbackWarning,
        )
        return None, method, True
    _check_untouched(flat, version)
    if block.numel() != (s1 - s0) * m * n:  # vmap gives every sample one shape
        _wrong_sample_size(f"{s0}:{s1}", block.numel() // max((s1 - s0) * n, 1), m)
    block, method = _checked_samples(
        fn, samples[s0:s1], s0, block.reshape((s1 - s0) * m, n).to(flat.dtype), method, m)
    return block, method, False


def _sample_pass(owner: Callable[[Tensor], Tensor], fn: Callable[[Tensor], Tensor], method: str,
                 compile: str) -> Callable[[Tensor], Tensor]:
    """``samples -> vmap(J of fn)(samples)``, compiled by ``compile`` per block shape."""

    def vectorized(samples: Tensor) -> Tensor:
        return run_pass(owner, (f"samples-{method}", samples.shape, samples.dtype, samples.device),
                        lambda: torch.func.vmap(_sample_jacobian(fn, method)), samples,
                        compile=compile)

    return vectorized


def _sample_jacobian(fn: Callable[[Tensor], Tensor], method: str) -> Callable[[Tensor], Tensor]:
    """``x -> J(x)``, the Jacobian of ``fn`` at one sample, ``m * n`` entries in row order.

    NOTE: [Per-sample Jacobians without jacrev and jacfwd]
        One VJP per output (``rev``) or one JVP per input (``fwd``) over the
        identity, vectorized: what ``torch.func.jacrev`` / ``jacfwd`` compute,
        without their general machinery (pytrees of inputs and outputs,
        chunking, splitting the basis per output). Under ``vmap`` over
        samples that machinery is traced with every pass, and for tiny
        per-sample functions it is a sixth of the time or more. Measured
        on 2 threads against ``vmap(jacrev)`` / ``vmap(jacfwd)``: 6-joint
        chain, B = 5,000: 1.12-1.22x / 1.26x (B = 100,000: 1.8x rev); UR5
        arm, B = 5,000: 1.06-1.20x / 1.0-1.1x; CNN, 16 images: 1.04-1.07x /
        1.33x, and 1.0x from 64 images, where the convolutions dominate.
        The results are bitwise equal (tests/maths/test_engine.py).
        Rows come out as ``(m, *in_shape)`` (``rev``) or the ``(n, *out_shape)``
        columns transposed (``fwd``); the caller reshapes them to ``(m, n)``.
    """
    if method == "fwd":
        def columns(x: Tensor) -> Tensor:
            n = x.numel()
            basis = torch.eye(n, dtype=x.dtype, device=x.device).reshape(n, *x.shape)
            cols = torch.func.vmap(lambda v: torch.func.jvp(fn, (x,), (v,))[1])(basis)
            return cols.reshape(n, math.prod(cols.shape[1:])).T

        return columns

    def rows(x: Tensor) -> Tensor:
        y, pullback = torch.func.vjp(fn, x)
        m = y.numel()
        (jac,) = torch.func.vmap(pullback)(
            torch.eye(m, dtype=y.dtype, device=y.device).reshape(m, *y.shape))
        return jac

    return rows


def _outputs_per_sample(
    fn: Callable[[Tensor], Tensor], method: str, vectorized: Callable[[Tensor], Tensor],
    samples: Tensor, flat: Tensor, version: int, whole: int,
) -> tuple[int, Tensor | None, str]:
    """``(m, rows, method)``: rows ``[0, whole)`` too when they are the whole batch (else None).

    The rows are checked (:func:`_checked_samples`); ``method`` is the one the
    call goes on with (``"loop"``: one row at a time, vmap was found wrong).
    """
    m, block = _whole_batch(vectorized, samples, flat, version, whole) if whole else (None, None)
    if m is None:
        with torch.no_grad():
            m = fn(flat[0].view(samples.shape[1:])).numel() if flat.shape[0] else 0
    if block is not None:
        block, method = _checked_samples(fn, samples, 0, block, method, m)
        method = method if block is not None else "loop"  # vmap is wrong: no second try
    return m, block, method


def _whole_batch(
    vectorized: Callable[[Tensor], Tensor], samples: Tensor, flat: Tensor, version: int,
    stop: int,
) -> tuple[int | None, Tensor | None]:
    """Rows ``[0, stop)`` in one pass over every sample, if they are the whole batch.

    Returns ``(m, rows)``: ``rows`` only when ``stop == B * m``; ``m`` only when
    the pass ran (``(None, None)`` when ``stop`` is no multiple of ``B`` or the
    pass failed).

    NOTE: [Per-sample rows: m from the pass itself]
        A caller that does not pass ``m`` and asks for rows ``[0, B * k)`` in
        one pass (``batched_rows(fn, xs, 0, B * m)``, the usual call) most
        likely asks for the whole batch: the pass over every sample runs
        first and its size gives ``m``, sparing the forward pass on
        ``xs[0]`` that would learn it (about 5% of a tiny per-sample
        function's time: 0.18 of 3.7 ms on the 6-joint chain at B = 5,000,
        benchmarks/scale.py). ``vmap`` gives every sample one output shape,
        so the size is exact. When ``m != k`` the rows are dropped and the
        range is computed as usual, with ``m`` known; a pass that fails is
        retried (and reported) by the usual path.
    """
    batch, n = flat.shape
    if not (batch and n and stop > 0 and stop % batch == 0):
        return None, None
    try:
        block = vectorized(samples)
    except RuntimeError:
        return None, None
    _check_untouched(flat, version)
    m = block.numel() // flat.numel()
    if m * batch != stop:
        return m, None
    return m, block.reshape(stop, n).to(flat.dtype)


def batched_rows(
    fn: Callable[[Tensor], Tensor],
    xs: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    method: str = "rev",
    compile: str = "auto",
) -> Tensor:
    """Rows ``[start, stop)`` over ``(sample, row)`` of the per-sample Jacobians.

    Args:
        fn, xs, start, stop, chunk_size, method, compile: as :func:`iter_batched_rows`.

    Returns:
        A ``(stop - start, xs[0].numel())`` tensor; ``.reshape(B, m, n)`` of a
        whole range gives the per-sample Jacobians.
    """
    blocks = iter_batched_rows(fn, xs, start, stop, chunk_size=chunk_size, method=method,
                               compile=compile)
    return _assemble(blocks, start, stop, xs.new_empty(0, xs[0].numel()))


# ---------------------------------------------------------------------------
# Checks of the engine's own rows (NOTE: [Checks on every engine call] in checks.py)
# ---------------------------------------------------------------------------


def strict_outputs(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``fn``, refusing outputs that have no real Jacobian with one :class:`OutputTypeError`.

    A tuple, dict, list, float or NumPy array, an integer or boolean tensor,
    and a complex tensor (whose real part alone reverse mode would
    differentiate, silently) are refused as ``pipeline.run`` refuses them.
    """
    if getattr(fn, "_jacpipe_strict", False):
        return fn

    def strict(t: Tensor) -> Tensor:
        y = fn(t)
        if not isinstance(y, Tensor):
            raise OutputTypeError(
                f"fn(x) must return a torch.Tensor, got {type(y).__name__}; return one "
                "tensor (torch.cat / torch.stack several outputs, torch.as_tensor a number)")
        if y.is_complex():
            raise OutputTypeError(
                f"fn(x) returned complex dtype {y.dtype}; jacpipe differentiates real outputs: "
                "return torch.view_as_real(y) (real and imaginary parts) or y.abs()")
        if not y.is_floating_point():
            raise OutputTypeError(
                f"fn(x) returned dtype {y.dtype}; a Jacobian needs a floating output (an "
                "integer or boolean output has no derivative): return a float tensor")
        return y

    strict._jacpipe_strict = True  # type: ignore[attr-defined]
    return strict


def _spot_rejected(unbatched: Callable[[Tensor], Tensor], rows: Tensor, a: int, like: Tensor,
                   what: str) -> bool:
    """Compare a random combination of a vectorised chunk's rows with one unbatched pullback.

    ``unbatched(c)`` is ``Jᵀ c`` by one pullback without vmap, ``c`` a random
    combination of rows ``[a, a + len(rows))`` (zero elsewhere). True
    (reported): the rows must be computed one at a time.

    NOTE: [A cheap spot check, the same verdict]
        The check costs one unbatched pullback of the graph the call's
        ``vjp`` already recorded (no new forward pass) plus a comparison.
        The rows picked and their weights depend only on ``(len(rows), a)``,
        so they are drawn once (:func:`_spot_draw`), and the comparison is
        one fused norm in the rows' dtype with one read-back: a combination
        within *half* the tolerance passes at once; anything else (a
        mismatch, a non-finite value, a borderline case) is judged again by
        :func:`checks.combination_mismatch` in float64, which gives the
        verdict and the message as before. On a 100 x 100 closure this took
        the check from about 0.45 ms to 0.15-0.2 ms per call on the loaded
        2-core machine (the pullback alone: 0.09 ms); ``python -m
        benchmarks.frontdoor --closure-only`` times a call with it.
    """
    count = rows.shape[0]
    if count < 2 or not checks.spot_checks() or not _SPOT_DUE.get():
        return False
    picked, index, w, w_norm = _spot_draw(count, a, rows.shape[1], rows.dtype, rows.device)
    cot = _spot_cotangent(index, w, a, like.numel(), like.dtype)
    try:
        plain = unbatched(cot)
    except RuntimeError:  # the unbatched pass cannot run: no verdict
        return False
    chosen = rows if len(picked) == count else _picked_rows(rows, index)
    if _spot_clearly_agrees(chosen, w, w_norm, plain):
        return False
    reason = checks.combination_mismatch(chosen, w, plain, a)
    if reason is not None:
        _SPOT_REJECTIONS[0] += 1
        checks.report(f"{what}: {reason}; computing them one at a time with "
                      "torch.autograd.grad (no vmap)", checks.VmapMismatchWarning)
    return reason is not None


def _picked_rows(rows: Tensor, index: Tensor) -> Tensor:
    """``rows[index]``, gathered along the memory order: a column-major chunk (``w @ x``
    layers) is read row of ``rows.T`` by row (mlp 2000: 0.13 ms instead of 0.47 ms)."""
    if rows.dim() == 2 and rows.shape[1] > 1 and rows.stride(0) == 1:
        return rows.T.index_select(1, index).T
    return rows.index_select(0, index)


_SPOT_DUE: contextvars.ContextVar[bool] = contextvars.ContextVar("jacpipe_spot_due",
                                                                 default=True)
_SPOT_REJECTIONS = [0]  # rejections so far (spot_rejections)


@contextlib.contextmanager
def spot_check_skipped() -> Iterator[None]:
    """Calls inside skip the vmap spot check (the front door's remembered calls between
    checked ones: NOTE: [Repeated calls of one function] in :mod:`pipeline.runner.front`)."""
    token = _SPOT_DUE.set(False)
    try:
        yield
    finally:
        _SPOT_DUE.reset(token)


def spot_rejections() -> int:
    """How many vmap spot checks of this process found vectorised rows wrong (so far)."""
    return _SPOT_REJECTIONS[0]


#: A chunk of at most this many entries (and 4 * :data:`checks.SPOT_ROWS`
#: rows) is combined whole by the spot check (every row, not
#: :data:`checks.SPOT_ROWS` of them: reading it costs less than picking rows).
SPOT_WHOLE_NUMEL = 2**16


@functools.lru_cache(maxsize=256)
def _spot_draw(count: int, a: int, width: int, dtype: torch.dtype, device: torch.device
               ) -> tuple[list[int], Tensor, Tensor, float]:
    """The spot check's rows of a chunk and their weights: ``(picked, picked as a
    tensor, weights, |weights|)``, drawn once (``checks.uniform``): every row of a
    small chunk (:data:`SPOT_WHOLE_NUMEL`), else ``checks.spot_rows``."""
    whole = count <= 4 * checks.SPOT_ROWS and count * width <= SPOT_WHOLE_NUMEL
    picked = list(range(count)) if whole else checks.spot_rows(count, a, count)
    like = torch.empty(0, dtype=dtype, device=device)
    w = checks.uniform((len(picked),), like, 7, a, count)
    index = torch.tensor(picked, dtype=torch.long, device=device)
    return picked, index, w, float(w.norm())


#: Outputs up to which the spot check's cotangent is kept between calls.
SPOT_KEEP_NUMEL = 2**16


def _spot_cotangent(index: Tensor, w: Tensor, a: int, m: int, dtype: torch.dtype) -> Tensor:
    """The weights ``w`` at rows ``a + index`` of ``m`` outputs (zero elsewhere), in
    ``dtype``; kept between calls for small ``m`` while nothing wrote into it (a custom
    ``backward`` may scale or clear its ``grad_output`` in place: NOTE: [A kept identity])."""
    if m > SPOT_KEEP_NUMEL:
        return _new_cotangent(index, w, a, m, dtype)
    kept = _kept_cotangent(index, w, a, m, dtype)
    if kept[0]._version != kept[1]:
        kept[0] = _new_cotangent(index, w, a, m, dtype)
        kept[1] = kept[0]._version
    return kept[0]


def _new_cotangent(index: Tensor, w: Tensor, a: int, m: int, dtype: torch.dtype) -> Tensor:
    cot = torch.zeros(m, dtype=dtype, device=w.device)
    cot[index + a] = w.to(dtype)
    return cot


@functools.lru_cache(maxsize=32)
def _kept_cotangent(index: Tensor, w: Tensor, a: int, m: int, dtype: torch.dtype) -> list[Any]:
    """``[cotangent, its version]``, one per key (updated in place when written into)."""
    cot = _new_cotangent(index, w, a, m, dtype)
    return [cot, cot._version]


def _spot_clearly_agrees(chosen: Tensor, w: Tensor, w_norm: float, plain: Tensor) -> bool:
    """``w @ chosen`` within half the spot tolerance of ``plain`` (NOTE: [A cheap spot check,
    the same verdict]); False also for non-finite values and other dtypes than float32
    and float64 (then judged in full).

    Computed in the rows' dtype: with at most 128 weights its rounding is at most
    ``128 * eps`` of the bound (float32: 8e-6), far below the half tolerance
    kept as margin (1.7e-4), so no combination beyond the tolerance passes here.
    """
    if chosen.dtype not in (torch.float32, torch.float64):
        return False
    chosen = chosen.detach() if chosen.requires_grad else chosen
    plain = plain.detach().reshape(-1) if plain.dim() != 1 or plain.requires_grad else plain
    plain = plain if plain.dtype == chosen.dtype else plain.to(chosen.dtype)
    # w @ chosen - plain in one op
    diff = torch.addmv(plain, chosen.T, w, beta=-1)
    diff, scale = torch.stack((torch.linalg.vector_norm(diff),
                               torch.linalg.vector_norm(chosen))).tolist()
    tol = checks.tolerance(chosen.dtype, checks.SPOT_RTOL)
    return math.isfinite(diff) and math.isfinite(scale) and diff <= 0.5 * tol * w_norm * scale


def plain_vjp(fn: Callable[[Tensor], Tensor], x: Tensor, u: Tensor, start: int = 0
              ) -> tuple[Tensor, torch.dtype]:
    """``(Jᵀ u, fn's output dtype)`` by one plain ``torch.autograd`` backward pass, no torch.func.

    ``u`` covers outputs ``[start, start + len(u))`` (zero elsewhere).
    """
    xg = _fresh(x).requires_grad_(True)
    with torch.enable_grad():
        y = fn(xg).reshape(-1)
    if not y.requires_grad:
        return x.new_zeros(x.numel()), y.dtype
    cot = y.new_zeros(y.numel()).detach()
    cot[start:start + u.numel()] = u.to(y.dtype)
    (g,) = torch.autograd.grad(y, xg, cot, allow_unused=True)
    return (x.new_zeros(x.numel()) if g is None else g.reshape(-1)), y.dtype


def _jacobian_forward_gap(fn: Callable[[Tensor], Tensor], x: Tensor, start: int, rows: Tensor
                          ) -> str | None:
    """``u . (rows v)`` against ``(Jᵀ u) . v`` (one plain VJP), ``u`` over these rows."""
    key = (start, rows.shape[0])
    u = checks.uniform((rows.shape[0],), rows, 1, *key)
    v = checks.uniform((x.numel(),), rows, 2, *key)
    jtu, out_dtype = plain_vjp(fn, x, u, start)
    return checks.disagreement(u, rows @ v, jtu, v, out_dtype=out_dtype)


def _hessian_forward_gap(fn: Callable[[Tensor], Tensor], x: Tensor, start: int, rows: Tensor
                         ) -> str | None:
    """``u . (rows v)`` against ``(H u) . v`` by reverse-over-reverse autograd."""
    key = (start, rows.shape[0])
    u = checks.uniform((rows.shape[0],), rows, 1, *key)
    v = checks.uniform((x.numel(),), rows, 2, *key)
    cot = rows.new_zeros(1, x.numel())
    cot[0, start:start + rows.shape[0]] = u
    return checks.disagreement(u, rows @ v, hessian_vector_products(fn, x)(cot)[0], v)


def _checked_samples(fn: Callable[[Tensor], Tensor], samples: Tensor, s0: int, block: Tensor,
                     method: str, m: int) -> tuple[Tensor | None, str]:
    """A chunk of per-sample rows after the checks: ``(rows, method for the rest)``.

    Forward mode: ``u . (J v)`` over every sample of the chunk against one
    vectorised VJP; rejected rows are computed again by reverse mode (and
    the call goes on in reverse mode). Reverse mode: a random combination
    of a random sample's rows against plain ``autograd.grad``; ``rows`` None
    when they differ (the caller computes the samples one row at a time).
    """
    if method == "fwd":
        if not checks.forward_rejected(
                lambda: _batched_forward_gap(fn, samples, s0, block, m), "per-sample rows"):
            return block, method
        block = torch.func.vmap(_sample_jacobian(fn, "rev"))(samples)
        block, method = block.reshape(-1, samples[0].numel()).to(samples.dtype), "rev"
    count = samples.shape[0]
    if count * m < 2 or not checks.spot_checks() or not _SPOT_DUE.get():
        return block, method
    s = checks.pick(0, count, s0, count)
    picked = checks.spot_rows(m, s0, count, s)
    w = checks.uniform((len(picked),), block, 8, s0, count)
    xg = _fresh(samples[s]).requires_grad_(True)
    try:
        with torch.enable_grad():
            y = fn(xg).reshape(-1)
        cot = y.new_zeros(y.numel()).detach()
        cot[picked] = w.to(y.dtype)
        g = torch.autograd.grad(y, xg, cot, allow_unused=True)[0] if y.requires_grad else None
    except RuntimeError:
        return block, method
    plain = xg.new_zeros(xg.numel()) if g is None else g.reshape(-1)
    reason = checks.combination_mismatch(block[[s * m + i for i in picked]], w, plain,
                                         (s0 + s) * m)
    if reason is None:
        return block, method
    _SPOT_REJECTIONS[0] += 1
    checks.report(f"per-sample rows: {reason}; computing them one at a time with "
                  "torch.autograd.grad (no vmap)", checks.VmapMismatchWarning)
    return None, method


def _batched_forward_gap(fn: Callable[[Tensor], Tensor], samples: Tensor, s0: int,
                         block: Tensor, m: int) -> str | None:
    """``sum_s u_s . (J_s v_s)`` from the rows against one vectorised VJP over the samples."""
    count, n = samples.shape[0], samples[0].numel()
    u = checks.uniform((count, m), block, 3, s0, count)
    v = checks.uniform((count, n), block, 4, s0, count)
    jv = torch.einsum("smn,sn->sm", block.reshape(count, m, n), v)

    def pulled(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        y, pullback = torch.func.vjp(fn, x)
        return pullback(w.reshape(y.shape).to(y.dtype))[0], y.new_zeros(())  # and y's dtype

    jtu, out = torch.func.vmap(pulled)(samples, u)
    return checks.disagreement(u, jv, jtu, v, out_dtype=out.dtype)


def jvps_by_reverse(fn: Callable[[Tensor], Tensor], x: Tensor, vs: Tensor) -> Tensor:
    """Rows ``J v`` for each row ``v`` of ``vs`` by reverse mode alone (no forward AD).

    ``J v = d/du ((Jᵀ u) . v)``: the VJP's graph is recorded once with
    ``create_graph`` and each ``v`` costs one backward pass of it, so the
    products are autograd's (hooks, ``no_grad`` blocks and custom backwards
    honoured). The fallback of a forward-mode sparse evaluation that
    disagrees with reverse mode.
    """
    xg = _fresh(x).requires_grad_(True)
    with torch.enable_grad():
        y = fn(xg).reshape(-1)
        out = y.new_zeros(vs.shape[0], y.numel()).detach()
        if not y.requires_grad:
            return out
        u = torch.zeros_like(y, requires_grad=True)
        (g,) = torch.autograd.grad(y, xg, u, create_graph=True, allow_unused=True)
    if g is None or not g.requires_grad:
        return out
    g = g.reshape(-1)
    for k in range(vs.shape[0]):
        (jv,) = torch.autograd.grad(g, u, vs[k].to(g.dtype), retain_graph=True,
                                    allow_unused=True)
        if jv is not None:
            out[k] = jv
    return out


def _report_unvectorised(reason: BaseException, what: str) -> None:
    """One report: vmap failed on fn (``reason``), so ``what`` are computed one at a time."""
    checks.report(
        f"fn cannot be vectorised with torch.func ({str(reason).splitlines()[0][:160]}); "
        f"computing {what} one at a time with torch.autograd.grad",
        VmapFallbackWarning,
    )
