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

    f = torch.func.grad(lambda t: flat(t).reshape(())) if kind_of(kind).symmetric else flat
    tangents = torch.stack([v, v.flip(0)]).to(xf.dtype)
    try:
        # NOTE: vectorised over two tangents, as the engine's forward rows are: the
        # batching rules of forward mode are checked too, so a shard of the same
        # function at the same x need not check again (checks.checking).
        out = torch.func.vmap(lambda t: torch.func.jvp(f, (xf,), (t,))[1])(tangents)[0]
    except RuntimeError:  # not vectorisable: the engine then computes rows one by one
        out = torch.func.jvp(f, (xf,), (tangents[0],))[1]
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


# ---------------------------------------------------------------------------
# The vmap spot check
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SpotCheck:
    """The outcome of :func:`vmap_spot_check`.

    Args:
        agree: the vectorised rows equal plain autograd's (to :data:`SPOT_RTOL`).
        rows: the rows compared (flat indices).
        window: the row range computed by the vectorised engine.
        seconds: wall time of the check.
        reason: one line saying what differs; empty when they agree.
    """

    agree: bool
    rows: list[int]
    window: list[int]
    seconds: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values."""
        return asdict(self)


#: Rows the spot check's vectorised pass computes (a window around its random rows).
SPOT_WINDOW = 8
#: Per-sample kinds: two whole samples are the window while they hold at most this many rows.
SPOT_SAMPLE_ROWS = 256


def vmap_spot_check(problem: Any, *, seed: int = 0, m: int | None = None) -> SpotCheck | None:
    """Compare two random rows of the vectorised engine with plain ``torch.autograd.grad``.

    NOTE: [The vmap spot check]
        ``vmap`` applies each op's batching rule, and a few are wrong (the
        backward of ``torch.cdist``: ``torch.func.jacrev`` is off by 80-200%,
        ``torch.autograd.functional.jacobian`` right). The check computes a
        small window of rows (:data:`SPOT_WINDOW`; per-sample kinds: two
        whole samples when they are small, so the pass vectorises over
        samples as a run's does) in one reverse-mode engine pass, and two
        random rows of it again with one plain ``autograd.grad`` each. On a
        disagreement the run computes its rows one at a time (the engine's
        per-row fallback) and says so. Each engine call also compares one
        random row of its first chunk with an unbatched pullback (NOTE:
        [Checks on every engine call]); this run-level check sees rows
        anywhere, not only a shard's first chunk, and a plain reference.

    Args:
        problem: a :class:`~pipeline.Problem` whose kind's rows are a
            Jacobian's (``jacobian``, ``hessian``, ``batched``).
        seed: seed of the rows drawn.
        m: outputs of ``fn`` (per sample), when known (spares a forward pass).

    Returns:
        A :class:`SpotCheck`, or None for kinds of other rows (Taylor mode)
        and where the rows cannot be computed (the run reports that itself).
    """
    import warnings

    import numpy as np

    from pipeline.maths.checks import VmapMismatchWarning, row_mismatch
    from pipeline.maths.kinds import iter_rows, maths_of

    maths = maths_of(problem.kind)
    if not maths.spec.jacobian_rows:
        return None
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    a, b, rows = _spot_rows(problem, rng, m)
    try:
        # the engine's own check compares a random combination of all the window's
        # rows with one unbatched pullback (and then fixes them): its warning counts
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = torch.cat([blk for _, blk in iter_rows(problem, a, b, method="rev", m=m)])
        plain = torch.as_tensor(_plain_rows(problem, rows, m))
    except Exception:  # noqa: BLE001 - the run meets (and reports) the same failure
        return None
    reasons = [str(w.message) for w in caught if issubclass(w.category, VmapMismatchWarning)]
    for r, want in zip(rows, plain, strict=True):
        reasons.extend(filter(None, [row_mismatch(got[r - a], want, r)]))
    return SpotCheck(not reasons, rows, [a, b], round(time.perf_counter() - t0, 6),
                     reasons[0] if reasons else "")


def _outputs(problem: Any, m: int | None) -> int:
    """``fn``'s outputs (per sample; Hessians: ``n``): ``m`` if given, else one forward pass."""
    from pipeline.maths.kinds import maths_of

    spec = maths_of(problem.kind).spec
    if spec.symmetric:
        return int(problem.x.numel())
    if m is None:
        x = problem.x[0] if spec.per_sample else problem.x
        with torch.no_grad():
            m = int(problem.fn(_fresh(x)).numel())
    return m


def _spot_rows(problem: Any, rng: Any, m: int | None) -> tuple[int, int, list[int]]:
    """The window ``[a, b)`` the spot check vectorises, and its two random rows."""
    from pipeline.maths.kinds import maths_of

    x, m = problem.x, _outputs(problem, m)
    if maths_of(problem.kind).spec.per_sample:
        batch = int(x.shape[0])
        if batch >= 2 and 2 * m <= SPOT_SAMPLE_ROWS:  # two whole samples: vmap over samples
            s = int(rng.integers(0, batch - 1))
            return s * m, (s + 2) * m, [s * m + int(rng.integers(0, m)),
                                        (s + 1) * m + int(rng.integers(0, m))]
        s = int(rng.integers(0, batch))
        total, base = m, s * m
    else:
        total, base = m, 0
    w = min(total, SPOT_WINDOW)
    a = base + int(rng.integers(0, total - w + 1))
    picks = sorted(rng.choice(w, size=min(2, w), replace=False).tolist())
    return a, a + w, [a + int(p) for p in picks]


def _plain_rows(problem: Any, rows: list[int], m: int | None) -> Any:
    """Rows by plain ``torch.autograd.grad``, one per row, no torch.func."""
    from pipeline.maths.kinds import maths_of, reference_rows

    spec = maths_of(problem.kind).spec
    if not spec.per_sample or spec.columns_over != "inputs":  # the kind's own plain rows
        return reference_rows(problem, rows)
    m = _outputs(problem, m)
    out = []
    for r in rows:
        xg = _fresh(problem.x[r // m]).requires_grad_(True)
        with torch.enable_grad():
            y = problem.fn(xg).reshape(-1)
        g = torch.autograd.grad(y[r % m], xg, allow_unused=True)[0] if y.requires_grad else None
        out.append(torch.zeros(xg.numel(), dtype=xg.dtype) if g is None
                   else g.reshape(-1).detach().cpu())
    return torch.stack(out)
