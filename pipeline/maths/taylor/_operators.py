"""The public transforms: directional derivatives, Laplacians, biharmonics, their estimators.

Each transform takes ``fn`` (a torch function of one tensor returning one
tensor) and returns a function of the point, in the style of ``torch.func``.
``batched=True`` makes that function take a batch of points ``(P, *shape)``
and push them all through one trace of ``vmap(fn)`` (the fast path); the
transforms also compose with ``torch.func.vmap``.

NOTE: [operators as collapsed jets]
With normalized coefficients along ``x(t) = x0 + t v`` the order-k
coefficient is ``D^k f[v, ..., v] / k!``. The Laplacian is
``sum_d D^2 f[e_d, e_d] = 2 * sum_d y2[d]``; ``tr(C H)`` with
``C = Q diag(lam) Q^T`` is ``2 * sum_j lam_j y2[q_j]``; so both propagate a
collapsed order-2 jet (the weighted sum of the top coefficients) with R = D
directions. The biharmonic is a fixed weighted sum of directional fourth
derivatives: ``d_i^2 d_j^2 f = (D4[e_i + e_j] + D4[e_i - e_j] - 2 D4[e_i] -
2 D4[e_j]) / 12`` (polarization of the symmetric 4-tensor), so
``Lap^2 f = sum_i (1 - (D - 1) / 3) D4[e_i] + (1 / 6) sum_(i<j) (D4[e_i + e_j] +
D4[e_i - e_j])`` over D^2 directions, one collapsed order-4 jet
(``D4 = 4! y4``). The estimators keep the directions apart (one value per
sample): Hutchinson, ``E[D^2 f[v, v]] = Lap f`` for Rademacher ``v`` (``L z``
for weights ``C = L L^T``); and for Gaussian ``v``,
``E[D^4 f[v, v, v, v]] = 3 Lap^2 f``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pipeline.maths.compiled import run_pass

from ._errors import TaylorError
from ._interpret import interpret
from ._series import Jet, Series
from ._trace import trace

Result = torch.Tensor | tuple


def taylor(fn: Callable[[torch.Tensor], torch.Tensor], order: int, *,
           batched: bool = False, compile: str = "auto"
           ) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """Directional derivatives up to ``order`` by one Taylor-mode pass.

    Args:
        fn: a torch function of one floating tensor, returning one tensor.
        order: K >= 0, the highest derivative.
        batched: the returned function takes points ``(P, *shape)`` and
            directions ``(P, *shape)`` (one per point), and ``fn`` is of one point.
        compile: ``"auto"``, ``"on"`` or ``"off"``: ``torch.compile`` the jet
            pass (NOTE: [compiled jet passes]).

    Returns:
        ``g(x, v) -> (f(x), D f[v], D^2 f[v, v], ..., D^K f[v, ..., v])``: plain
        (unnormalized) derivatives, each shaped like ``f(x)``.

    Raises:
        TaylorError: a bad ``order``, ``x`` or ``v`` (the message says what arrived).
    """
    _check_int("order", order, 0)

    def directional(x: torch.Tensor, v: torch.Tensor) -> tuple:
        _check_point(x, batched)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise TaylorError(f"taylor: v must be a tensor shaped like x {tuple(x.shape)}, "
                              f"got {got}: pass one direction per point")
        v = v.to(x.dtype)
        x0 = x.unsqueeze(0)
        coeffs = [x0, v.unsqueeze(0)] + [torch.zeros_like(x0)] * (order - 1)
        out = _run(fn, x, Series(order, 1), coeffs[: order + 1], batched, compile)
        return tuple(c[0] * math.factorial(k) for k, c in enumerate(out))

    return directional


def laplacian(fn: Callable[[torch.Tensor], torch.Tensor], *,
              weights: torch.Tensor | None = None, samples: int | None = None,
              seed: int = 0, batched: bool = False, return_value: bool = False,
              compile: str = "auto") -> Callable[[torch.Tensor], Result]:
    """The Laplacian ``sum_d d^2 f / dx_d^2`` (or ``tr(C H)``), per output of ``fn``.

    Args:
        fn: a torch function of one floating tensor, returning one tensor.
        weights: ``None`` (the Laplacian), a ``(D,)`` tensor (``C`` diagonal) or a
            ``(D, D)`` symmetric matrix ``C`` (positive semi-definite for ``samples``),
            ``D = x.numel()`` of one point.
        samples: ``None``: exact (one collapsed jet over the D coordinate
            directions); an int S: the Hutchinson estimate from S Rademacher
            directions (``L z`` with ``C = L L^T`` for weights).
        seed: the seed of the estimator's directions (deterministic per seed).
        batched: the returned function takes points ``(P, *shape)`` (fast path).
        return_value: also return ``f(x)``.
        compile: as :func:`taylor`.

    Returns:
        ``g(x)``: ``Lap f(x)`` shaped like ``f(x)``; with ``samples``, ``(estimate,
        stderr)`` (stderr = sample std / sqrt(S)); with ``return_value``,
        ``(f(x), that)``.

    Raises:
        TaylorError: bad ``x``, ``weights`` or ``samples``.
    """
    if samples is not None:
        _check_int("samples", samples, 2)

    def apply(x: torch.Tensor) -> Result:
        _check_point(x, batched)
        shape = x.shape[1:] if batched else x.shape
        n = math.prod(shape)
        if samples is not None:
            v = _rademacher(x, samples, seed, batched)
            if weights is not None:  # v = L z
                lead = v.shape[: v.ndim - len(shape)]
                v = (v.reshape(*lead, n) @ _factor(weights, n, x).T).reshape(v.shape)
            y = _plain(fn, x, v, 2, batched, compile)
            return _estimate(y, 1.0, return_value)
        dirs, w = _laplacian_directions(weights, n, x)
        y = _collapsed(fn, x, dirs.reshape(-1, *shape), w, 2, batched, compile)
        lap = y[2][0] * 2
        return (y[0][0], lap) if return_value else lap

    return apply


def biharmonic(fn: Callable[[torch.Tensor], torch.Tensor], *, samples: int | None = None,
               seed: int = 0, batched: bool = False, return_value: bool = False,
               compile: str = "auto") -> Callable[[torch.Tensor], Result]:
    """The biharmonic ``Lap^2 f = sum_(i,j) d_i^2 d_j^2 f``, per output of ``fn``.

    Args:
        fn: a torch function of one floating tensor, returning one tensor.
        samples: ``None``: exact (one collapsed order-4 jet over D^2 directions,
            NOTE: [operators as collapsed jets]); an int S: the estimate
            ``D^4 f[v, v, v, v] / 3`` averaged over S Gaussian directions.
        seed: the seed of the estimator's directions.
        batched: the returned function takes points ``(P, *shape)`` (fast path).
        return_value: also return ``f(x)``.
        compile: as :func:`taylor`.

    Returns:
        ``g(x)``: ``Lap^2 f(x)`` shaped like ``f(x)``; with ``samples``, ``(estimate,
        stderr)``; with ``return_value``, ``(f(x), that)``.

    Raises:
        TaylorError: bad ``x`` or ``samples``.
    """
    if samples is not None:
        _check_int("samples", samples, 2)

    def apply(x: torch.Tensor) -> Result:
        _check_point(x, batched)
        shape = x.shape[1:] if batched else x.shape
        n = math.prod(shape)
        if samples is not None:
            gen = torch.Generator().manual_seed(seed)
            pts = (x.shape[0],) if batched else ()
            v = torch.randn((samples, *pts, *shape), generator=gen, dtype=x.dtype).to(x.device)
            y = _plain(fn, x, v, 4, batched, compile)
            return _estimate(y, 3.0, return_value)
        dirs, w = _biharmonic_directions(n, x)
        y = _collapsed(fn, x, dirs.reshape(-1, *shape), w, 4, batched, compile)
        bih = y[4][0] * 24
        return (y[0][0], bih) if return_value else bih

    return apply


# ---------------------------------------------------------------------------


def _run(fn: Callable, x: torch.Tensor, s: Series, coeffs: list, batched: bool,
         compile: str = "auto") -> Jet:
    """The jet of ``fn`` at the jet ``coeffs``: one pass of the traced graph (``compile``).

    NOTE: [compiled jet passes]
        The pass ``(coefficients, weights) -> output coefficients`` (the
        interpreter over the traced graph, with its rules) goes through
        :func:`pipeline.maths.compiled.run_pass`, owned by the traced graph
        (a changed ``fn``, shape or dtype is another trace, hence another
        pass) and keyed by the series' shape: ``torch.compile`` fuses the
        rules' many small ops into a few kernels once the eager seconds pay
        for compiling (``"auto"``), from the first call (``"on"``) or never
        (``"off"``).
    """
    gm = trace(fn, x, batched=batched)
    order, directions, collapsed = s.order, s.directions, s.collapsed

    def build() -> Callable:
        def jet_pass(coeffs: list, weights: torch.Tensor | None) -> Any:
            out = interpret(gm, Series(order, directions, collapsed=collapsed, weights=weights),
                            Jet(coeffs))
            return tuple(out) if isinstance(out, Jet) else out

        return jet_pass

    key = ("jet", order, directions, collapsed, s.weights is not None,
           tuple(None if c is None else c.shape for c in coeffs), x.dtype, x.device)
    out = run_pass(gm, key, build, list(coeffs), s.weights, compile=compile)
    out = Jet(out) if isinstance(out, tuple) else out
    if not isinstance(out, Jet):  # f does not depend on x
        out = Jet([out.unsqueeze(0)] + [torch.zeros((s.size(k), *out.shape), dtype=out.dtype,
                                                    device=out.device)
                                        for k in range(1, s.order + 1)])
    return out


def _collapsed(fn: Callable, x: torch.Tensor, dirs: torch.Tensor, w: torch.Tensor | None,
               order: int, batched: bool, compile: str = "auto") -> Jet:
    """The collapsed jet of order ``order`` along ``dirs`` (R, *shape of one point)."""
    r = dirs.shape[0]
    if batched:
        dirs = dirs.unsqueeze(1).expand(r, *x.shape)
    x0 = x.unsqueeze(0)
    coeffs = [x0, dirs] + [x.new_zeros((r, *x.shape))] * (order - 2) + [torch.zeros_like(x0)]
    return _run(fn, x, Series(order, r, collapsed=True, weights=w), coeffs, batched, compile)


def _plain(fn: Callable, x: torch.Tensor, v: torch.Tensor, order: int,
           batched: bool, compile: str = "auto") -> Jet:
    """The order-``order`` jet along each of the S directions ``v`` (S, *x.shape)."""
    x0 = x.unsqueeze(0)
    coeffs = [x0, v] + [torch.zeros_like(v)] * (order - 1)
    return _run(fn, x, Series(order, v.shape[0]), coeffs, batched, compile)


def _estimate(y: Jet, scale: float, return_value: bool) -> Result:
    order = len(y) - 1
    draws = y[order] * (math.factorial(order) / scale)
    est = draws.mean(0)
    err = draws.std(0) / math.sqrt(draws.shape[0])
    return (y[0][0], (est, err)) if return_value else (est, err)


def _rademacher(x: torch.Tensor, samples: int, seed: int, batched: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (samples, *x.shape)
    v = torch.randint(0, 2, shape, generator=gen).to(dtype=x.dtype, device=x.device)
    return 2 * v - 1


def _laplacian_directions(weights: torch.Tensor | None, n: int,
                          x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    if weights is None:
        return eye, None
    w = _weights(weights, n, x)
    if w.ndim == 1:
        return eye, w
    lam, q = torch.linalg.eigh(w)
    return q.T.contiguous(), lam


def _weights(weights: torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(weights, torch.Tensor) or weights.shape not in ((n,), (n, n)):
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights)
        raise TaylorError(f"weights must be a tensor of shape ({n},) (diagonal C) or ({n}, {n})"
                          f" for a point of {n} entries, got {got}")
    w = weights.to(dtype=x.dtype, device=x.device)
    if w.ndim == 2 and not torch.allclose(w, w.T):
        raise TaylorError("weights C must be symmetric (tr(C H) sees only its symmetric part): "
                          "pass (C + C.T) / 2")
    return w


def _factor(weights: torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    """``L`` with ``C = L L^T`` (C diagonal or a PSD matrix)."""
    w = _weights(weights, n, x)
    if w.ndim == 1:
        if (w < 0).any():
            raise TaylorError("the Hutchinson estimate with weights needs C >= 0: "
                              f"got a negative weight {float(w.min()):g}")
        return torch.diag(w.sqrt())
    lam, q = torch.linalg.eigh(w)
    if (lam < -1e-12 * lam.abs().max().clamp_min(1)).any():
        raise TaylorError("the Hutchinson estimate with weights needs a positive "
                          f"semi-definite C: its smallest eigenvalue is {float(lam.min()):g}")
    return q * lam.clamp_min(0).sqrt()


def _biharmonic_directions(n: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    i, j = torch.triu_indices(n, n, offset=1)
    dirs = torch.cat([eye, eye[i] + eye[j], eye[i] - eye[j]])
    w = torch.cat([torch.full((n,), 1 - (n - 1) / 3, dtype=x.dtype),
                   torch.full((2 * i.numel(),), 1 / 6, dtype=x.dtype)]).to(x.device)
    return dirs, w


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TaylorError(f"{name} must be an int >= {low}, got {value!r}")


def _check_point(x: object, batched: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TaylorError(f"x must be a torch.Tensor, got {type(x).__name__}: "
                          "wrap it with torch.as_tensor(x, dtype=torch.float64)")
    if not x.is_floating_point():
        raise TaylorError(f"x must be a floating tensor, got dtype {x.dtype}: "
                          "convert it with x.to(torch.float64)")
    if batched and x.ndim == 0:
        raise TaylorError("batched=True needs points of shape (P, *shape), got a 0-dim "
                          "tensor: pass x[None] or batched=False")
