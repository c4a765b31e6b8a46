"""Higher-order kinds as rows: per-point operators and third-derivative tensors.

The per-point kinds (``laplacian``, ``biharmonic``, ``taylor``) evaluate an
operator of ``fn`` at each of ``P`` points with the Taylor-mode transforms of
:mod:`pipeline.maths.taylor`, chunk of points by chunk; a row is a point. The
``third`` kind's row ``(j, k)`` (``j <= k``) is ``grad d^2 f / dx_j dx_k`` of a
scalar ``f``: one reverse pass over a second-order jet, vectorised over the
rows of a chunk.

NOTE: [Random directions per point]
    A stochastic estimate draws its directions for point ``p`` from
    ``numpy.random.default_rng([seed, p])`` (Rademacher for the Laplacian,
    Gaussian for the biharmonic), never from the chunk or the shard: any
    number of shards and any chunk size give the same bytes, and a resumed
    shard recomputes exactly what it lost. Drawing costs ~20 us a point, noise
    beside the operator.

NOTE: [Third derivatives by polarization]
    ``d^2 f / dx_j dx_k = (D^2 f[e_j + e_k] - D^2 f[e_j] - D^2 f[e_k]) / 2`` with
    ``D^2 f[v]`` the second directional derivative: one order-2 Taylor pass of
    three directions per row, and ``grad`` of it, vectorised over the rows of
    a chunk with ``vmap``. No nesting of reverse modes: each row costs one
    reverse pass over its own jet (a shared jet of all the chunk's directions,
    differentiated by ``vmap(vjp)``, costs chunk x directions: quadratic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.core.errors import JacpipeError
from pipeline.core.pairs import pair_of_row
from pipeline.maths.taylor._operators import _factor as psd_factor

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.problem.problem import Problem


def _chunks(start: int, stop: int, chunk: int | None) -> Iterator[tuple[int, int]]:
    step = max(1, chunk or (stop - start) or 1)
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


# ---------------------------------------------------------------------------
# Per-point operators
# ---------------------------------------------------------------------------


def point_columns(problem: Problem, start: int, stop: int, *, chunk_size: int | None = None,
                  compile: str = "auto") -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Rows ``[start, stop)`` (points) of a per-point kind: ``values``, ``value``, [``stderr``].

    Args:
        problem: a ``laplacian``, ``biharmonic`` or ``taylor`` problem (points ``(P, D)``).
        start, stop: the points.
        chunk_size: points per Taylor pass (None: all at once).
        compile: ``--compile`` of the Taylor passes (:mod:`pipeline.maths.compiled`).

    Yields:
        ``(first_point, {"values": (r, k), "value": (r, k)[, "stderr": (r, k)]})``
        with ``k`` the outputs of ``fn``: the operator, ``fn`` itself and, for a
        stochastic estimate, its standard error.
    """
    if not 0 <= start <= stop <= problem.x.shape[0]:
        raise JacpipeError(f"points [{start}, {stop}) outside 0..{problem.x.shape[0]}")
    evaluate = _OPERATORS[problem.kind]
    options = {**(problem.operator or {}), "compile": compile}
    for a, b in _chunks(start, stop, chunk_size):
        cols = evaluate(problem.fn, problem.x[a:b], a, options)
        yield a, {name: t.detach().reshape(b - a, -1) for name, t in cols.items()}


def point_rows(fn: Callable[[Tensor], Tensor], x: Tensor, start: int, stop: int, *,
               chunk_size: int | None = None, method: str = "rev", kind: str = "laplacian",
               operator: Mapping[str, Any] | None = None) -> Iterator[tuple[int, Tensor]]:
    """The ``values`` column of :func:`point_columns` alone (the engine's row interface)."""
    del method  # Taylor mode has one method
    from pipeline.problem.problem import Problem

    problem = Problem(fn, x, kind=kind, operator=operator)  # type: ignore[arg-type]
    for a, cols in point_columns(problem, start, stop, chunk_size=chunk_size):
        yield a, cols["values"]


def _laplacian(fn: Callable, pts: Tensor, first: int, options: dict) -> dict[str, Tensor]:
    from pipeline.maths.taylor import laplacian

    weights = _tensor(options.get("weights"), pts)
    if options.get("samples") is None:
        value, lap = laplacian(fn, weights=weights, batched=True, return_value=True,
                               compile=options["compile"])(pts)
        return {"values": lap, "value": value}
    v = _directions(first, pts, options, gaussian=False)  # (S, r, D)
    if weights is not None:
        v = v @ psd_factor(weights, pts.shape[1], pts).T  # C = L L^T, v = L z
    return _estimate(fn, pts, v, order=2, scale=1.0, compile=options["compile"])


def _biharmonic(fn: Callable, pts: Tensor, first: int, options: dict) -> dict[str, Tensor]:
    from pipeline.maths.taylor import biharmonic

    if options.get("samples") is None:
        value, bih = biharmonic(fn, batched=True, return_value=True,
                                compile=options["compile"])(pts)
        return {"values": bih, "value": value}
    # E[D^4 f[v, v, v, v]] = 3 Lap^2 f for v ~ N(0, I) (Isserlis)
    return _estimate(fn, pts, _directions(first, pts, options, gaussian=True), order=4,
                     scale=3.0, compile=options["compile"])


def _taylor(fn: Callable, pts: Tensor, first: int, options: dict) -> dict[str, Tensor]:
    del first
    from pipeline.maths.taylor import taylor

    order = int(options["order"])
    v = _tensor(options["direction"], pts).reshape(1, -1).expand(pts.shape[0], -1)
    out = taylor(fn, order=order, batched=True, compile=options["compile"])(pts, v.contiguous())
    return {"values": out[order], "value": out[0]}


_OPERATORS: dict[str, Callable[[Callable, Tensor, int, dict], dict[str, Tensor]]] = {
    "laplacian": _laplacian, "biharmonic": _biharmonic, "taylor": _taylor,
}


def _estimate(fn: Callable, pts: Tensor, v: Tensor, *, order: int, scale: float,
              compile: str = "auto") -> dict[str, Tensor]:
    """Mean and standard error over the S directions ``v`` (S, r, D) of ``D^order f[v] / scale``."""
    from pipeline.maths.taylor import taylor

    s, r = v.shape[0], pts.shape[0]
    reps = pts.unsqueeze(0).expand(s, *pts.shape).reshape(s * r, -1)
    out = taylor(fn, order=order, batched=True, compile=compile)(reps, v.reshape(s * r, -1))
    draws = (out[order] / scale).reshape(s, r, -1)
    return {"values": draws.mean(0), "value": out[0].reshape(s, r, -1)[0],
            "stderr": draws.std(0) / math.sqrt(s)}


def _directions(first: int, pts: Tensor, options: Mapping[str, Any], *, gaussian: bool
                ) -> Tensor:
    """``(S, r, D)`` directions of points ``first ..`` (NOTE: [Random directions per point])."""
    samples, seed = int(options["samples"]), int(options.get("seed", 0))
    r, d = pts.shape
    out = np.empty((r, samples, d))
    for i in range(r):
        rng = np.random.default_rng([seed, first + i])
        out[i] = (rng.standard_normal((samples, d)) if gaussian
                  else rng.integers(0, 2, (samples, d)) * 2.0 - 1.0)
    return torch.from_numpy(out).to(pts.dtype).to(pts.device).transpose(0, 1)


def _tensor(value: Any, like: Tensor) -> Tensor | None:
    if value is None:
        return None
    return torch.as_tensor(np.asarray(value, dtype=np.float64)).to(like.dtype).to(like.device)


# ---------------------------------------------------------------------------
# Third derivatives
# ---------------------------------------------------------------------------


def iter_third_rows(fn: Callable[[Tensor], Tensor], x: Tensor, start: int, stop: int, *,
                    chunk_size: int | None = None, method: str = "rev", pattern: Any = None
                    ) -> Iterator[tuple[int, Tensor]]:
    """Rows ``[start, stop)`` of a scalar ``fn``'s third derivatives (NOTE: [Third derivatives
    by polarization]).

    Args:
        fn: a scalar function of ``x``.
        x: the point.
        start, stop: flat rows over the pairs ``j <= k`` (row-major over the upper triangle).
        chunk_size: rows per vectorised pass (None: all at once).
        method: ``rev`` (the only one: a reverse pass over each row's jet).
        pattern: the Hessian's sparsity pattern (``n x n``, anything with
            ``tocsr()``), or None. Rows ``(j, k)`` outside it are zero (their
            second derivative is zero everywhere) and are not computed.

    Yields:
        ``(first_row, block)``, ``block`` of shape ``(rows, x.numel())``.
    """
    del method
    from pipeline.maths.taylor import taylor

    n = x.numel()
    total = n * (n + 1) // 2
    if not 0 <= start <= stop <= total:
        raise JacpipeError(f"rows [{start}, {stop}) outside the {total} pairs j <= k of x")
    flat = x.detach().reshape(-1)
    shape = x.shape
    second = taylor(lambda t: fn(t.reshape(shape)).reshape(()), order=2, batched=True)

    def mixed(point: Tensor, ej: Tensor, ek: Tensor) -> Tensor:
        # D^2 f along e_j, e_k and e_j + e_k: one order-2 jet of three directions
        d2 = second(point.expand(3, n), torch.stack([ej, ek, ej + ek]))[2]
        return (d2[2] - d2[0] - d2[1]) / 2  # j == k: (4 f_jj - 2 f_jj) / 2

    rows_of = torch.func.vmap(torch.func.grad(mixed), in_dims=(None, 0, 0))
    eye = torch.eye(n, dtype=flat.dtype, device=flat.device)
    second(flat.expand(3, n), eye[:1].expand(3, n))  # trace once, outside vmap(grad)
    csr = None if pattern is None else pattern.tocsr()
    for a, b in _chunks(start, stop, chunk_size):
        j, k = pair_of_row(np.arange(a, b), n)
        keep = np.ones(b - a, bool) if csr is None else np.asarray(csr[j, k]).reshape(-1) != 0
        block = flat.new_zeros(b - a, n)
        if keep.any():
            sel = torch.as_tensor(np.flatnonzero(keep))
            block[sel] = _mixed_rows(rows_of, flat, eye[torch.as_tensor(j[keep])],
                                     eye[torch.as_tensor(k[keep])])
        yield a, block


def _mixed_rows(rows_of: Callable, flat: Tensor, ej: Tensor, ek: Tensor) -> Tensor:
    """The rows ``grad d^2 f / dx_j dx_k`` of the pairs whose unit vectors are ``ej``, ``ek``."""
    return rows_of(flat, ej, ek)


def point_row_numel(problem: Problem) -> int:
    """Elements one point carries through a per-point pass (chunks from the memory budget).

    ``fn``'s intermediates at one point, once per Taylor coefficient and direction:
    ``D`` directions (collapsed: plus one sum) for the exact Laplacian, ``D^2``
    for the exact biharmonic, ``S`` for a stochastic estimate, one for ``taylor``.
    """
    from pipeline.maths.engine import intermediate_numel

    options = dict(problem.operator or {})
    point = problem.x[0].detach()
    d = point.numel()
    order = {"laplacian": 2, "biharmonic": 4}.get(problem.kind, int(options.get("order", 1)))
    if options.get("samples") is not None:
        directions = 2 * int(options["samples"])  # the point repeated once per draw
    elif problem.kind in _EXACT_DIRECTIONS:
        directions = _EXACT_DIRECTIONS[problem.kind](d)
    else:
        directions = 1
    return intermediate_numel(problem.fn, point) * (1 + order * directions)


_EXACT_DIRECTIONS: dict[str, Callable[[int], int]] = {
    "laplacian": lambda d: d + 1, "biharmonic": lambda d: d * d + 1,
}


def third_row_numel(problem: Problem) -> int:
    """Elements one row of the ``third`` kind carries: about three order-2 directions of
    ``fn``'s intermediates, and their cotangents in the reverse pass."""
    from pipeline.maths.engine import intermediate_numel

    return 2 * 3 * 3 * intermediate_numel(problem.fn, problem.x.detach())


# ---------------------------------------------------------------------------
# References: nested torch.func, in one process
# ---------------------------------------------------------------------------


def point_reference_rows(problem: Problem, rows: Any) -> np.ndarray:
    """The operator at points ``rows`` by nested ``torch.func`` (exact; ``(len(rows), k)``)."""
    options = dict(problem.operator or {})
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)

    def at(point: Tensor) -> Tensor:
        return _NESTED[problem.kind](problem.fn, point, options).reshape(-1)

    out = [torch.func.vmap(at)(problem.x[torch.as_tensor(rows[a:b])].detach())
           for a, b in _chunks(0, len(rows), REFERENCE_CHUNK)]
    if not out:
        return np.zeros((0, 0))
    return torch.cat(out).detach().cpu().numpy()


#: Points per vectorised reference pass (nested torch.func under vmap).
REFERENCE_CHUNK = 32


def point_reference(problem: Problem) -> np.ndarray:
    """The operator at every point by nested ``torch.func``."""
    return point_reference_rows(problem, np.arange(problem.x.shape[0]))


def _nested_laplacian(fn: Callable, x: Tensor, options: Mapping[str, Any]) -> Tensor:
    h = torch.func.hessian(fn)(x)  # (*out, D, D)
    d = x.numel()
    h = h.reshape(-1, d, d)
    w = _tensor(options.get("weights"), x)
    c = torch.eye(d, dtype=x.dtype, device=x.device) if w is None else (
        torch.diag(w) if w.ndim == 1 else w)
    return (h * c).sum((-2, -1))


def _nested_biharmonic(fn: Callable, x: Tensor, options: Mapping[str, Any]) -> Tensor:
    def lap(t: Tensor) -> Tensor:
        return _nested_laplacian(fn, t, {})

    return _nested_laplacian(lap, x, {})


def _nested_taylor(fn: Callable, x: Tensor, options: Mapping[str, Any]) -> Tensor:
    v = _tensor(options["direction"], x).reshape(x.shape)
    g = fn
    for _ in range(int(options["order"])):
        g = (lambda f: lambda t: torch.func.jvp(f, (t,), (v,))[1])(g)
    return g(x)


_NESTED: dict[str, Callable[[Callable, Tensor, Mapping[str, Any]], Tensor]] = {
    "laplacian": _nested_laplacian, "biharmonic": _nested_biharmonic, "taylor": _nested_taylor,
}


def third_reference(problem: Problem) -> np.ndarray:
    """``jacrev(jacrev(jacrev(fn)))`` at ``x``, as the kind's rows ``(n (n + 1) / 2, n)``."""
    x = problem.x.detach()
    n = x.numel()

    def f(t: Tensor) -> Tensor:
        return problem.fn(t.reshape(x.shape)).reshape(())

    t3 = torch.func.jacrev(torch.func.jacrev(torch.func.jacrev(f)))(x.reshape(-1))
    j, k = pair_of_row(np.arange(n * (n + 1) // 2), n)
    return t3[torch.as_tensor(j), torch.as_tensor(k)].detach().cpu().numpy()


def third_reference_rows(problem: Problem, rows: Any) -> np.ndarray:
    """Rows ``(j, k)`` by plain autograd nested three times (one process, no Taylor mode)."""
    x = problem.x.detach().clone().requires_grad_(True)
    n = x.numel()
    j, k = pair_of_row(np.asarray(rows, dtype=np.int64).reshape(-1), n)
    out = []
    with torch.enable_grad():
        (g,) = torch.autograd.grad(problem.fn(x).reshape(()), x, create_graph=True)
        g = g.reshape(-1)
        for a, b in zip(j, k, strict=True):
            (hk,) = torch.autograd.grad(g[int(b)], x, create_graph=True, allow_unused=True)
            hjk = hk.reshape(-1)[int(a)] if hk is not None else None
            row = None
            if hjk is not None and hjk.requires_grad:
                (row,) = torch.autograd.grad(hjk, x, retain_graph=True, allow_unused=True)
            out.append(torch.zeros(n, dtype=x.dtype) if row is None else row.reshape(-1))
    return torch.stack(out).detach().cpu().numpy() if out else np.zeros((0, n))
