"""Does forward mode give autograd's answer? One JVP against one VJP at the point.

NOTE: [The adjoint check]
    For any ``u`` and ``v``, ``u . (J v) = (Jᵀ u) . v``: both are
    ``sum_ij u_i J_ij v_j``. Forward mode computes ``J v`` (one JVP), reverse
    mode ``Jᵀ u`` (one VJP), so with random ``u`` and ``v`` the two numbers
    agree to rounding exactly when both modes differentiate the same
    function. They do not when ``fn`` holds something only reverse mode
    honours: a ``torch.no_grad()`` block (forward AD ignores it), a tensor
    hook that rescales a gradient, ``nn.Embedding(padding_idx=...)`` (no
    gradient for the padding row, a tangent all the same), a custom
    ``autograd.Function`` whose ``jvp`` disagrees with its ``backward``. The
    reverse side is plain ``torch.autograd`` (what
    ``torch.autograd.functional.jacobian`` uses), the forward side is
    ``torch.func.jvp`` (what ``--method fwd`` uses). Hessians compare ``H v``
    by forward-over-reverse (``--method fwd``) with ``H u`` by
    reverse-over-reverse (autograd's ``hessian``); per-sample Jacobians
    check a few samples drawn at random across the batch as one function of
    their stack (every engine call then checks all of its samples:
    NOTE: [Checks on every engine call] in :mod:`pipeline.maths.checks`).

NOTE: [Tolerance of the adjoint check]
    The two numbers are compared relative to the Cauchy-Schwarz bound
    ``scale = max(|u| |J v|, |Jᵀ u| |v|)``, which bounds both and the rounding
    of the sums that make them. Measured on every built-in job (small
    parameters, seeds 0..7, ``benchmarks/adjoint.py``): the largest
    ``|u.(Jv) - (Jᵀu).v| / scale`` is 5.3e-8 in float32 and 1.9e-16 in
    float64, under 2 unit roundoffs; the default tolerance
    :data:`ADJOINT_RTOL` is 100 machine epsilons (1.2e-5 and 2.2e-14),
    over 100 times the largest value seen. The broken functions of
    ``tests/maths/test_adjoint.py`` (10 inputs) miss by 8.5e-4 to 1.8e-2 over seeds
    0..7, 70 to 1500 times the float32 tolerance.

    Its power has a limit, measured with the same script's sizes: a
    derivative wrong by a relative (Frobenius) error ``d`` moves
    ``rel_error`` by about ``d / sqrt(m)`` (the bound grows as ``sqrt(m)``,
    a random projection of the error does not), so in float32 a wrong
    derivative is seen when ``d`` is above about ``1.2e-5 * sqrt(m)``: 0.1%
    at ``m = 10^4``, 1% at ``m = 10^6``. Rounding does not grow the same
    way (relative to the bound it fell from 0.6 to 0.01 unit roundoffs
    from ``mlp`` m = 20 to ``heat`` m = 40,000), so the tolerance need not
    grow with ``m``; float64 sees any error above about ``1e-11``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.core.kinds import kind_of
from pipeline.maths.checks import ADJOINT_RTOL, adjoint_gap, tolerance
from pipeline.maths.engine import _fresh, _refuse_input_writes, hessian_vector_products

__all__ = ["ADJOINT_RTOL", "AdjointCheck", "adjoint_check"]

KINDS = ("jacobian", "hessian", "batched")
#: Samples of a batched problem the check differentiates, drawn at random
#: across the whole batch (seeded): never the first few, which may all be
#: samples where forward and reverse mode happen to agree (zero vectors).
SAMPLES = 4


@dataclass(frozen=True)
class AdjointCheck:
    """The outcome of :func:`adjoint_check`.

    Args:
        agree: forward and reverse mode compute the same derivative at ``x``
            (to rounding); ``False`` also when either could not run or the
            derivative is not finite there.
        uJv: ``u . (J v)`` by forward mode (NaN if it could not run).
        JTu_v: ``(Jᵀ u) . v`` by reverse mode (NaN if it could not run).
        rel_error: ``|uJv - JTu_v| / scale`` (NaN if not computed).
        tolerance: the largest ``rel_error`` taken as rounding.
        seconds: wall time of the check.
        reason: one line saying what was found; empty when they agree.
    """

    agree: bool
    uJv: float
    JTu_v: float
    rel_error: float
    tolerance: float
    seconds: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-safe values (non-finite floats as strings)."""
        return {k: _json_float(v) for k, v in asdict(self).items()}


def adjoint_check(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    kind: str = "jacobian",
    seed: int = 0,
    rtol: float | None = None,
) -> AdjointCheck:
    """Check that forward mode differentiates ``fn`` as reverse mode (autograd) does.

    Costs one forward + backward pass of ``fn`` and one JVP (Hessians: one
    double backward and one forward-over-reverse product); see NOTE: [The
    adjoint check].

    Args:
        fn: the function (``kind="batched"``: of one sample; ``"hessian"``:
            scalar).
        x: the point (``"batched"``: the batch; :data:`SAMPLES` samples drawn
            from it at random are checked).
        kind: ``"jacobian"``, ``"hessian"`` or ``"batched"``.
        seed: seed of the random ``u`` and ``v``.
        rtol: tolerance relative to the Cauchy-Schwarz bound; default
            :data:`ADJOINT_RTOL` of ``x``'s dtype.

    Returns:
        An :class:`AdjointCheck`; ``agree=False`` says forward mode must not
        be used for this problem (``reason`` says why).

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    t0 = time.perf_counter()
    tol = rtol if rtol is not None else tolerance(x.dtype)
    nan = float("nan")

    def result(agree: bool, a: float, b: float, rel: float, reason: str) -> AdjointCheck:
        return AdjointCheck(agree, a, b, rel, tol, round(time.perf_counter() - t0, 6), reason)

    if kind_of(kind).per_sample:
        picked = _samples(int(x.shape[0]), seed)
        one = fn
        x = x[picked]

        def fn(t: Tensor) -> Tensor:
            return torch.stack([one(t[i]) for i in range(len(picked))])

    # Reverse side first: it gives m, and it is the reference.
    try:
        if kind_of(kind).symmetric:
            m = x.numel()
            u, v = _vectors(m, x.numel(), x, seed)
            reverse = hessian_vector_products(fn, x)(u[None])[0]  # H u
        else:
            xg = _fresh(x).requires_grad_(True)
            with torch.enable_grad():
                y = fn(xg).reshape(-1)
            m = y.numel()
            u, v = _vectors(m, x.numel(), x, seed)
            reverse = torch.zeros_like(v)
            if y.requires_grad:
                (g,) = torch.autograd.grad(y, xg, u.to(y.dtype), allow_unused=True)
                if g is not None:
                    reverse = g.reshape(-1)
    except Exception as exc:  # noqa: BLE001 - any failure of fn is reported, not raised
        reason = _one_line(exc)
        try:
            _refuse_input_writes(fn, x)
        except ValueError as write:
            reason = str(write)
        return result(False, nan, nan, nan, f"reverse mode cannot run: {reason}")
    b = float((reverse.double() * v.double()).sum())
    try:
        forward = _forward(fn, x, v, kind)
    except Exception as exc:  # noqa: BLE001 - a function torch.func cannot transform
        return result(
            False, nan, b, nan,
            f"forward mode cannot run ({_one_line(exc)}); use reverse mode",
        )
    a, b, rel = adjoint_gap(u, forward, reverse, v)
    if rel != rel:  # NaN: a product or the bound is not finite
        return result(
            False, a, b, nan,
            f"the derivative at x is not finite (u.(J v) = {a:.6g}, (J^T u).v = {b:.6g}): "
            "forward and reverse mode cannot be compared there; reverse mode is autograd's",
        )
    if rel <= tol:
        return result(True, a, b, rel, "")
    return result(
        False, a, b, rel,
        f"forward and reverse mode give different derivatives: u.(J v) = {a:.6g} by forward "
        f"mode, (J^T u).v = {b:.6g} by reverse mode (relative difference {rel:.2g} > {tol:.2g}); "
        "fn holds something forward mode ignores (torch.no_grad, a tensor hook, "
        "nn.Embedding padding_idx, a custom autograd.Function whose jvp disagrees with its "
        "backward): use reverse mode",
    )


def _samples(batch: int, seed: int) -> list[int]:
    """:data:`SAMPLES` distinct samples of ``batch``, drawn at random (seeded), sorted."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    return sorted(torch.randperm(batch, generator=g)[:SAMPLES].tolist())


def _forward(fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, kind: str) -> Tensor:
    """``J v`` (Hessian: ``H v`` by forward-over-reverse) with ``torch.func.jvp``."""
    xf = _fresh(x).reshape(-1)
    version = xf._version

    def flat(t: Tensor) -> Tensor:
        return fn(t.reshape(x.shape)).reshape(-1)

    if kind_of(kind).symmetric:
        grad = torch.func.grad(lambda t: flat(t).reshape(()))
        out = torch.func.jvp(grad, (xf,), (v.to(xf.dtype),))[1]
    else:
        out = torch.func.jvp(flat, (xf,), (v.to(xf.dtype),))[1]
    if xf._version != version:
        from pipeline.maths.engine import INPUT_WRITE_MESSAGE, InputWriteError

        raise InputWriteError(INPUT_WRITE_MESSAGE)
    return out.reshape(-1)


def _vectors(m: int, n: int, like: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded ``u`` (``m``) and ``v`` (``n``), uniform on ``[-1, 1)``, drawn on the CPU.

    Uniform float32 draws: ``randn`` in float64 took 3-14 ms for 160,000
    entries on the 2-core test machine, more than the function (heat N=400).
    Any continuous distribution makes a wrong derivative miss with
    probability 0.
    """
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(m, generator=g, dtype=torch.float32).mul_(2).sub_(1)
    v = torch.rand(n, generator=g, dtype=torch.float32).mul_(2).sub_(1)
    return u.to(like.device, like.dtype), v.to(like.device, like.dtype)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _json_float(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return value
