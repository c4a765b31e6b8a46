"""The maths: rows of Jacobians, Hessians and per-sample Jacobians. No Ray here.

Every function computes a contiguous range ``[start, stop)`` of rows of a
derivative, in chunks, and either returns them (``*_rows``) or yields them
chunk by chunk (``iter_rows``) so a caller can stream them to disk without
holding the whole range.

NOTE: [Rows by reverse mode]
    Row ``i`` of ``J = d f(x) / d x`` is ``e_iᵀ J``, one vector-Jacobian
    product. ``torch.func.vjp`` records the forward pass once; ``vmap`` over the
    pullback then evaluates many ``e_iᵀ J`` in one batched backward pass. We
    build each chunk's basis rows lazily, so memory is ``chunk × (m + n +
    activations)`` and never ``rows × m``.

NOTE: [Rows by forward mode]
    Column ``j`` of ``J`` is ``J e_j``, one Jacobian-vector product over all
    ``m`` outputs. For tall Jacobians (``m ≫ n``) ``n`` JVPs give every row at
    once: a shard computes ``J e_j`` for all ``j`` in column chunks and keeps its
    own rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

METHODS = ("rev", "fwd")


class VmapFallbackWarning(UserWarning):
    """The function could not be vectorised; rows are computed one by one."""


def _flat_fn(fn: Callable[[Tensor], Tensor], shape: torch.Size) -> Callable[[Tensor], Tensor]:
    return lambda t: fn(t.reshape(shape)).reshape(-1)


def _chunks(start: int, stop: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    step = max(1, chunk_size or (stop - start) or 1)
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


def basis_rows(start: int, stop: int, size: int, like: Tensor) -> Tensor:
    """Rows ``[start, stop)`` of the ``size × size`` identity, dtype/device of ``like``."""
    basis = like.new_zeros(stop - start, size)
    basis.diagonal(offset=start).fill_(1)  # basis[k, start + k] = 1
    return basis


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
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_row, block)`` for rows ``[start, stop)`` of ``J``, chunk by chunk.

    Args:
        fn: function of ``x``; any input and output shape.
        x: the point; float32 or float64 (kept in the result).
        start, stop: flat output row range over ``fn(x).reshape(-1)``.
        chunk_size: rows (``rev``) or columns (``fwd``) per vectorised pass;
            ``None`` means all at once.
        method: ``"rev"`` (one VJP per row) or ``"fwd"`` (one JVP per column).

    Yields:
        ``(a, block)`` with ``block`` of shape ``(b - a, x.numel())``.
    """
    if method == "fwd":
        try:
            blocks = list(_iter_rows_fwd(fn, x, start, stop, chunk_size=chunk_size))
        except RuntimeError as exc:
            yield from _iter_rows_loop(fn, x, start, stop, chunk_size=chunk_size, reason=exc)
            return
        yield from blocks
        return
    if method != "rev":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    x_flat = x.detach().reshape(-1)
    try:
        y, pullback = torch.func.vjp(_flat_fn(fn, x.shape), x_flat)
    except RuntimeError as exc:
        yield from _iter_rows_loop(fn, x, start, stop, chunk_size=chunk_size, reason=exc)
        return
    _check_range(start, stop, y.numel())
    vectorised = torch.func.vmap(pullback)
    for a, b in _chunks(start, stop, chunk_size):
        try:
            (rows,) = vectorised(basis_rows(a, b, y.numel(), y))
        except RuntimeError as exc:
            yield from _iter_rows_loop(fn, x, a, stop, chunk_size=chunk_size, reason=exc)
            return
        yield a, rows


def _iter_rows_loop(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None,
    reason: BaseException,
) -> Iterator[tuple[int, Tensor]]:
    """Rows one ``autograd.grad`` at a time: the fallback for non-vectorisable functions."""
    warnings.warn(
        f"fn cannot be vectorised with torch.func ({str(reason).splitlines()[0][:160]}); "
        "computing Jacobian rows one at a time with torch.autograd.grad",
        VmapFallbackWarning,
        stacklevel=3,
    )
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = fn(xg).reshape(-1)
    _check_range(start, stop, y.numel())
    for a, b in _chunks(start, stop, chunk_size):
        block = x.new_empty(b - a, x.numel())
        for i in range(a, b):
            (g,) = torch.autograd.grad(y[i], xg, retain_graph=True, allow_unused=True)
            block[i - a] = 0 if g is None else g.reshape(-1)
        yield a, block


def _iter_rows_fwd(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None,
) -> Iterator[tuple[int, Tensor]]:
    x_flat = x.detach().reshape(-1)
    n = x_flat.numel()
    f = _flat_fn(fn, x.shape)
    with torch.no_grad():
        m = f(x_flat).numel()
    _check_range(start, stop, m)
    if stop <= start:
        return
    out = x_flat.new_empty(stop - start, n)

    def column(v: Tensor) -> Tensor:
        return torch.func.jvp(f, (x_flat,), (v,))[1][start:stop]

    vectorised = torch.func.vmap(column)
    for a, b in _chunks(0, n, chunk_size):
        out[:, a:b] = vectorised(basis_rows(a, b, n, x_flat)).T
    yield start, out


def jacobian_rows(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    method: str = "rev",
) -> Tensor:
    """Rows ``[start, stop)`` of ``d fn(x).flatten() / d x.flatten()``.

    Args:
        fn: function of ``x``; any input and output shape.
        x: the point; float32 or float64 (kept in the result).
        start, stop: flat output row range; an empty range gives ``(0, n)``.
        chunk_size: rows (``rev``) or columns (``fwd``) per vectorised pass.
        method: ``"rev"`` or ``"fwd"``.

    Returns:
        A ``(stop - start, x.numel())`` tensor.
    """
    blocks = [blk for _, blk in iter_jacobian_rows(
        fn, x, start, stop, chunk_size=chunk_size, method=method
    )]
    if not blocks:
        return x.new_empty(0, x.numel())
    return torch.cat(blocks) if len(blocks) > 1 else blocks[0]


def _check_range(start: int, stop: int, m: int) -> None:
    if not 0 <= start <= stop <= m:
        raise ValueError(f"row range [{start}, {stop}) outside [0, {m})")


# ---------------------------------------------------------------------------
# Hessian
# ---------------------------------------------------------------------------


def iter_hessian_rows(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    method: str = "rev",
) -> Iterator[tuple[int, Tensor]]:
    """Yield rows ``[start, stop)`` of the Hessian of a scalar ``fn`` at ``x``.

    ``rev`` is reverse-over-reverse (a VJP of the gradient, vmapped over basis
    rows); ``fwd`` is forward-over-reverse (``H e_i`` by a JVP of the gradient,
    which equals row ``i`` since ``H`` is symmetric).
    """
    x_flat = x.detach().reshape(-1)
    n = x_flat.numel()
    _check_range(start, stop, n)
    f = _flat_fn(fn, x.shape)

    def scalar(t: Tensor) -> Tensor:
        return f(t).reshape(())

    grad = torch.func.grad(scalar)
    if method == "rev":
        _, pullback = torch.func.vjp(grad, x_flat)
        rows_of = torch.func.vmap(lambda v: pullback(v)[0])
    elif method == "fwd":
        rows_of = torch.func.vmap(lambda v: torch.func.jvp(grad, (x_flat,), (v,))[1])
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for a, b in _chunks(start, stop, chunk_size):
        yield a, rows_of(basis_rows(a, b, n, x_flat))


def hessian_rows(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    method: str = "rev",
) -> Tensor:
    """Rows ``[start, stop)`` of the Hessian of scalar ``fn`` at ``x`` (flat indices)."""
    blocks = [b for _, b in iter_hessian_rows(
        fn, x, start, stop, chunk_size=chunk_size, method=method
    )]
    return torch.cat(blocks) if blocks else x.new_empty(0, x.numel())


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
) -> Iterator[tuple[int, Tensor]]:
    """Yield rows ``[start, stop)`` of the per-sample Jacobians of ``fn`` over ``xs``.

    Row ``r`` is row ``r % m`` of the Jacobian of ``fn`` at sample ``r // m``
    (``m`` outputs per sample); never the ``B²`` cross terms. Samples are
    vectorised together with their rows: ``vmap`` over samples of
    ``vmap`` over basis rows (``rev``) or basis columns (``fwd``).

    Args:
        chunk_size: rows per vectorised pass, rounded to whole samples.
    """
    sample_shape = xs.shape[1:]
    flat = xs.detach().reshape(xs.shape[0], -1)
    n = flat.shape[1]
    f = _flat_fn(fn, sample_shape)
    with torch.no_grad():
        m = f(flat[0]).numel()
    _check_range(start, stop, m * xs.shape[0])
    if stop <= start:
        return
    per_sample = torch.func.jacfwd(f) if method == "fwd" else torch.func.jacrev(f)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    vectorised = torch.func.vmap(per_sample)
    step = max(1, (chunk_size or (stop - start)) // m)
    first, last = start // m, (stop - 1) // m + 1
    for s0 in range(first, last, step):
        s1 = min(s0 + step, last)
        block = vectorised(flat[s0:s1]).reshape((s1 - s0) * m, n)
        a, b = max(start, s0 * m), min(stop, s1 * m)
        yield a, block[a - s0 * m : b - s0 * m]


def batched_rows(
    fn: Callable[[Tensor], Tensor],
    xs: Tensor,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    method: str = "rev",
) -> Tensor:
    """Rows ``[start, stop)`` over ``(sample, row)`` of the per-sample Jacobians."""
    blocks = [b for _, b in iter_batched_rows(
        fn, xs, start, stop, chunk_size=chunk_size, method=method
    )]
    n = xs[0].numel()
    return torch.cat(blocks) if blocks else xs.new_empty(0, n)


def iter_rows(
    problem: Any,
    start: int,
    stop: int,
    *,
    chunk_size: int | None = None,
    method: str = "rev",
) -> Iterator[tuple[int, Tensor]]:
    """Dispatch on ``problem.kind``: the one entry point the workers call."""
    kind = problem.kind
    if kind == "jacobian":
        it = iter_jacobian_rows
    elif kind == "hessian":
        it = iter_hessian_rows
    elif kind == "batched":
        it = iter_batched_rows
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return it(problem.fn, problem.x, start, stop, chunk_size=chunk_size, method=method)
