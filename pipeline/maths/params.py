"""Per-sample Jacobians with respect to a network's parameters (kind ``params``).

Row ``r`` is output ``r % m`` of sample ``r // m``; its ``P`` columns are the
flattened parameters of :class:`~pipeline.problem.module.ModuleFunction`.

NOTE: [Parameter rows: vmap over samples of jacrev over parameters]
    A chunk of ``s`` whole samples is one ``vmap`` over the samples of
    ``jacrev`` over the flat parameter vector (``torch.func``'s per-sample
    gradient recipe with ``functional_call``): ``s * m`` cotangents in one
    batched backward pass, each producing a ``P``-vector. ``chunk_size``
    counts those cotangents (like the engine's rows) and is rounded down to
    whole samples; a sample whose ``m`` rows exceed it is computed alone, by
    ``jacrev(chunk_size=...)``. Rows of a sample cut by a shard boundary are
    computed with their whole sample and sliced.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.problem.module import ModuleFunction
    from pipeline.problem.problem import Problem


def _jac(fn: ModuleFunction, method: str, chunk: int | None) -> Any:
    """``(flat, x) -> (m, P)``: one sample's parameter Jacobian.

    Differentiated with respect to each parameter tensor and concatenated: the
    backward of slicing one flat vector into the parameters would write every
    parameter's gradient into a zero ``P``-vector of its own, per row.
    """
    def out(params: tuple[Tensor, ...], x: Tensor) -> Tensor:
        state = dict(zip(fn.names, params, strict=True))
        return fn.call_state(state, x).reshape(-1)

    jac = torch.func.jacfwd(out) if method == "fwd" else torch.func.jacrev(out, chunk_size=chunk)

    def rows(flat: Tensor, x: Tensor) -> Tensor:
        parts = jac(tuple(fn.unflatten(flat).values()), x)
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    return rows


def iter_param_rows(
    fn: ModuleFunction, xs: Tensor, start: int, stop: int, *,
    chunk_size: int | None = None, method: str = "rev", m: int | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_row, block)`` for rows ``[start, stop)``; blocks are ``(rows, P)``.

    Args:
        fn: the module function (``Problem.from_module(...).fn``).
        xs: the inputs ``(N, *in_shape)``.
        start, stop: rows over ``(sample, output)`` flattened as ``b * m + i``.
        chunk_size: cotangents (``rev``) or tangents (``fwd``: ``P`` per
            sample) per vectorised pass; ``None``: all samples at once.
        method: ``"rev"`` or ``"fwd"``.
        m: outputs per sample, when known.

    Raises:
        ValueError: a row range outside ``N * m``.
    """
    if m is None:
        with torch.no_grad():
            m = int(fn(xs[0]).numel())
    batch, p = int(xs.shape[0]), fn.numel
    if not 0 <= start <= stop <= batch * m:
        raise ValueError(f"row range [{start}, {stop}) outside [0, {batch * m})")
    if stop == start:
        return
    per = p if method == "fwd" else m
    step = max(1, chunk_size // per) if chunk_size else batch
    inner = chunk_size if chunk_size and chunk_size < m and method != "fwd" else None
    jac = torch.func.vmap(_jac(fn, method, inner), in_dims=(None, 0))
    flat = fn.flat.detach()
    first, last = start // m, (stop - 1) // m + 1
    for s0 in range(first, last, step):
        s1 = min(s0 + step, last)
        block = jac(flat, xs[s0:s1].detach()).reshape((s1 - s0) * m, p)
        a, b = max(start, s0 * m), min(stop, s1 * m)
        yield a, block[a - s0 * m:b - s0 * m]


def param_rows(fn: ModuleFunction, xs: Tensor, start: int, stop: int, *,
               chunk_size: int | None = None) -> Tensor:
    """Rows ``[start, stop)`` as one ``(stop - start, P)`` tensor."""
    blocks = [b for _, b in iter_param_rows(fn, xs, start, stop, chunk_size=chunk_size)]
    return torch.cat(blocks) if blocks else fn.flat.new_zeros(0, fn.numel)


def param_row_numel(problem: Problem) -> int:
    """Elements one cotangent carries through a pass: the intermediates and a ``P``-row."""
    from pipeline.maths.engine import intermediate_numel

    x = problem.x[0].detach()
    return intermediate_numel(problem.fn, x) + problem.fn.numel


def _sample_reference(fn: ModuleFunction, x: Tensor) -> Tensor:
    """One sample's ``(m, P)`` by ``torch.autograd.functional.jacobian``."""
    jac = torch.autograd.functional.jacobian(
        lambda flat: fn.call(flat, x).reshape(-1), fn.flat.detach())
    return jac.reshape(-1, fn.numel)


def param_reference(problem: Problem) -> Any:
    """Every row by ``torch.autograd.functional.jacobian``, per sample: ``(N m, P)`` numpy."""
    xs = problem.x.detach()
    return torch.cat([_sample_reference(problem.fn, xs[b]) for b in range(xs.shape[0])]
                     ).detach().cpu().numpy()


def param_reference_rows(problem: Problem, rows: Any) -> Any:
    """Rows ``rows`` by ``torch.autograd.functional.jacobian`` of each sample they touch."""
    import numpy as np

    xs = problem.x.detach()
    with torch.no_grad():
        m = int(problem.fn(xs[0]).numel())
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), problem.fn.numel), dtype=xs.cpu().numpy().dtype)
    for s in np.unique(rows // m):
        jac = _sample_reference(problem.fn, xs[int(s)]).detach().cpu().numpy()
        hit = rows // m == s
        out[hit] = jac[rows[hit] % m]
    return out
