"""Finite-difference cross-checks of Jacobian columns, and detection of kinks.

``fd_check`` differentiates ``fn`` numerically along a few input directions
``e_j`` and compares the result with the corresponding columns ``J[:, j]`` of a
Jacobian computed by automatic differentiation (AD). Along the way it tests
whether ``fn`` is differentiable at ``x`` along ``e_j`` at all: at a kink
(``|t|``, ``max(0, t)``, a contact penalty at its switching point) AD returns
one of the one-sided derivatives and a central difference returns their
average, so a disagreement there is a property of ``fn``, not a bug.

The module is pure: it imports torch only when ``x`` is a tensor and never
imports Ray.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

# NOTE: [Error model of the finite differences]
# Let delta_i be the absolute rounding error of one evaluation of f_i. We take
#     delta_i = EVAL_ULPS * eps * (max over the evaluations of |f_i| + ||f(x)||_inf),
# the second term covering outputs that are small by cancellation of large terms.
# With D(s) = fwd(s) - bwd(s) = (f(x+s) - 2 f(x) + f(x-s)) / s:
#   * smooth f:  D(s) = s f''(x) + O(s^3), so D(h/4) ~ D(h) / 4;
#   * kink of jump J = f'(x+) - f'(x-) within distance s/4 of x:
#                D(s) = J + O(s), so D(h/4) ~ D(h).
# Richardson extrapolation of the two gives the jump itself,
#     jump = (4 D(h/4) - D(h)) / 3 = f'(x+) - f'(x-) + O(h^3 f''''),
# whose rounding error is at most (16 * 4/3 + 4/3) * 4 delta / (4 h) ~ 23 delta / h
# (KINK_NOISE below). A kink is reported when, for some output i,
#     |jump_i| > KINK_NOISE * delta_i / h  +  0.5 * |D_i(h)|.
# The second term is the truncation guard: for smooth f, |jump| / |D(h)| is
# ~0 (f'' dominates) or ~5/16 (f'' = 0, f'''' dominates), both below 0.5;
# at a kink the ratio is ~1, so the test needs |jump| > 2 * rounding noise.
EVAL_ULPS = 4.0
KINK_NOISE = 23.0
KINK_RATIO = 0.5


@dataclass(frozen=True)
class ColumnCheck:
    """The finite-difference check of one input column ``j``.

    Attributes:
        index: flat input index ``j`` (column of J).
        h: the (representable) central step used along ``x_j``.
        abs_err: ``max_i |AD_ij - FD_ij|`` against the central difference.
        rel_err: ``abs_err / max_i |FD_ij|``.
        agree: AD agrees with FD within tolerance. At a detected kink this
            means AD lies between the two one-sided derivatives (a valid
            one-sided derivative / subgradient), not that it equals the
            central difference, which is their average.
        kink: ``fn`` is not differentiable at ``x`` along ``e_j`` (within
            ``h/4`` of ``x``).
        kink_jump: ``max_i |f_i'(x+) - f_i'(x-)|`` estimated along ``e_j``
            (about 0 for smooth columns, up to rounding).
        kink_row: the output row where the kink test is most clearly met
            (``None`` without a kink).
        fd_scale: ``max_i |FD_ij|``, the column's size.
    """

    index: int
    h: float
    abs_err: float
    rel_err: float
    agree: bool
    kink: bool
    kink_jump: float
    kink_row: int | None
    fd_scale: float

    @property
    def verdict(self) -> str:
        """One word for a table: ok, kink, or MISMATCH."""
        if not self.agree:
            return "MISMATCH"
        return "kink (AD one-sided)" if self.kink else "ok"


def _agreement(check: ColumnCheck) -> str:
    """The ``AD≈FD`` cell: at a kink AD is one one-sided derivative, not the central FD."""
    if not check.agree:
        return "NO"
    return "kink (one-sided)" if check.kink else "yes"


@dataclass
class FDReport:
    """What :func:`fd_check` found, one :class:`ColumnCheck` per sampled input.

    Attributes:
        checks: one entry per checked column, in the order requested.
        fd_dtype: dtype the finite differences were evaluated in.
        fd_dtype_reason: why that dtype (``fn`` accepted or refused float64).
        rtol: relative tolerance used.
        atol: absolute tolerance used, or ``None`` for the default
            ``rtol * max_i |FD_ij|`` (per column).
        shape: ``(m, n)`` of the Jacobian.
    """

    HEADER: ClassVar[tuple[str, ...]] = (
        "input",
        "h",
        "max |AD-FD|",
        "rel err",
        "AD≈FD",
        "kink jump",
        "verdict",
    )

    checks: list[ColumnCheck]
    fd_dtype: str
    fd_dtype_reason: str
    rtol: float
    atol: float | None
    shape: tuple[int, int]
    notes: list[str] = field(default_factory=list)

    @property
    def nonsmooth_inputs(self) -> list[int]:
        """Input indices along which ``fn`` has a kink at ``x``."""
        return [c.index for c in self.checks if c.kink]

    @property
    def disagreeing_columns(self) -> list[int]:
        """Columns where AD and FD disagree beyond tolerance (kinks accounted for)."""
        return [c.index for c in self.checks if not c.agree]

    @property
    def ok(self) -> bool:
        """No column disagrees."""
        return not self.disagreeing_columns

    def rows(self) -> list[tuple[str, ...]]:
        """Rows of strings matching :attr:`HEADER`, e.g. for ``rich.table.Table.add_row``."""
        out = []
        for c in self.checks:
            out.append(
                (
                    str(c.index),
                    f"{c.h:.2e}",
                    f"{c.abs_err:.2e}",
                    f"{c.rel_err:.2e}",
                    _agreement(c),
                    f"{c.kink_jump:.3g}" if c.kink else "-",
                    c.verdict,
                )
            )
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become ``None``)."""
        return {
            "shape": list(self.shape),
            "fd_dtype": self.fd_dtype,
            "fd_dtype_reason": self.fd_dtype_reason,
            "rtol": self.rtol,
            "atol": self.atol,
            "nonsmooth_inputs": self.nonsmooth_inputs,
            "disagreeing_columns": self.disagreeing_columns,
            "ok": self.ok,
            "notes": list(self.notes),
            "checks": [
                {k: _finite_or_none(v) for k, v in asdict(c).items()} | {"verdict": c.verdict}
                for c in self.checks
            ],
        }

    def dumps(self) -> str:
        """:meth:`to_json` as a strict-JSON string."""
        return json.dumps(self.to_json(), allow_nan=False)


def sample_columns(n: int, k: int, seed: int = 0) -> list[int]:
    """Pick ``min(k, n)`` distinct input columns of ``range(n)``, sorted, reproducibly.

    Args:
        n: number of columns.
        k: how many to pick.
        seed: seed of the draw.

    Returns:
        Sorted distinct column indices; all of ``range(n)`` when ``k >= n``.

    Raises:
        ValueError: negative ``n`` or ``k``.
    """
    if n < 0 or k < 0:
        raise ValueError(f"sample_columns: expected n >= 0 and k >= 0, got n={n}, k={k}")
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


def fd_check(
    fn: Callable[[Any], Any],
    x: Any,
    ad_columns: Callable[[np.ndarray], np.ndarray] | np.ndarray,
    cols: Sequence[int],
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> FDReport:
    """Check Jacobian columns against finite differences and detect kinks.

    For each sampled input ``j`` with ``h = eps**(1/3) * max(1, |x_j|)``:

    * central ``(f(x + h e_j) - f(x - h e_j)) / 2h`` is compared with ``J[:, j]``;
    * forward/backward one-sided differences at steps ``h`` and ``h/4`` decide
      whether ``fn`` has a kink at ``x`` along ``e_j``: for smooth ``fn`` their
      difference ``fwd - bwd`` shrinks in proportion to the step (4x from ``h``
      to ``h/4``); at a kink it stays at the jump ``f'(x+) - f'(x-)``. The
      Richardson combination ``(4 D(h/4) - D(h)) / 3`` estimates the jump, and
      it is flagged when it exceeds both ``23 * delta / h`` (the rounding
      bound, ``delta = 4 eps (|f_i| + ||f||_inf)`` per evaluation) and half of
      ``|D(h)|`` (the truncation guard). See NOTE [Error model] in the source.

    ``eps`` is the machine epsilon of the dtype the differences are evaluated
    in: **float64 whenever fn accepts a float64 copy of x and returns float64**
    (e.g. jobs whose constants are Python floats), else the dtype of ``x``
    (e.g. a float32 network whose weights are float32 tensors). The report
    records which (``fd_dtype``, ``fd_dtype_reason``). Steps are made exactly
    representable (``h = (x_j + h) - x_j``).

    AD agrees with FD on output ``i`` when
    ``|AD_i - FD_i| <= atol + rtol * |FD_i| + fd_err_i``, where ``fd_err_i`` is
    the FD's own error estimate (rounding ``delta/h`` plus the truncation seen
    as ``2 |C(h) - C(h/4)|``, ``C`` the central difference). At a detected
    kink AD is accepted when it lies (within the same tolerance) between the
    one-sided derivatives, since AD legitimately returns one of them.

    Args:
        fn: the function whose Jacobian is checked: a torch function of a
            tensor when ``x`` is a tensor, else a NumPy function of an array.
            Rows are ``fn(x).reshape(-1)``, columns ``x.reshape(-1)``.
        x: the point (``torch.Tensor`` or ``np.ndarray``).
        ad_columns: the AD Jacobian: either the full ``(m, n)`` array, or a
            callable taking the int array of ``cols`` and returning
            ``J[:, cols]`` of shape ``(m, len(cols))`` (how the pipeline reads
            columns from its stored result).
        cols: flat input indices to check (see :func:`sample_columns`).
        rtol: relative tolerance; default ``1e-6`` when both AD and FD are
            float64, else ``1e-3``.
        atol: absolute tolerance; default ``rtol * max_i |FD_ij|`` per column.

    Returns:
        An :class:`FDReport`.

    Raises:
        ValueError: a column index out of range, or AD columns of the wrong shape.
    """
    evaluate, x0, fd_dtype, reason = _evaluator(fn, x)
    n = x0.size
    cols = [int(c) for c in cols]
    bad = [c for c in cols if not 0 <= c < n]
    if bad:
        raise ValueError(f"fd_check: column indices {bad[:5]} out of range for n={n} inputs")

    f0 = evaluate(x0)
    m = f0.size
    ad, ad_dtype = _ad_block(ad_columns, cols, m, n)
    low_precision = fd_dtype != np.float64 or ad_dtype != np.float64
    if rtol is None:
        rtol = 1e-3 if low_precision else 1e-6
    eps = float(np.finfo(fd_dtype).eps)
    f_inf = float(np.max(np.abs(f0))) if m else 0.0

    checks = []
    for k, j in enumerate(cols):
        xj = x0[j]
        h = eps ** (1.0 / 3.0) * max(1.0, abs(float(xj)))
        steps = (h, h / 4.0)
        # f at x + s e_j and x - s e_j for s in steps, with the representable steps.
        evals: list[tuple[np.ndarray, float, np.ndarray, float]] = []
        for s in steps:
            xp, xm = x0.copy(), x0.copy()
            xp[j] = xj + fd_dtype.type(s)
            xm[j] = xj - fd_dtype.type(s)
            sp = float(xp[j]) - float(xj)
            sm = float(xj) - float(xm[j])
            evals.append((evaluate(xp), sp, evaluate(xm), sm))
        (fp, hp, fm, hm), (fpq, hpq, fmq, hmq) = evals

        delta = EVAL_ULPS * eps * (np.max(np.abs(np.stack([f0, fp, fm, fpq, fmq])), axis=0) + f_inf)
        central = (fp - fm) / (hp + hm)
        central_q = (fpq - fmq) / (hpq + hmq)
        fwd, bwd = (fp - f0) / hp, (f0 - fm) / hm
        fwd_q, bwd_q = (fpq - f0) / hpq, (f0 - fmq) / hmq
        d_h, d_q = fwd - bwd, fwd_q - bwd_q

        jump = np.abs(4.0 * d_q - d_h) / 3.0
        kink_tol = KINK_NOISE * delta / h + KINK_RATIO * np.abs(d_h)
        excess = jump - kink_tol
        kink = bool(m) and bool(np.any(excess > 0))
        kink_row = int(np.argmax(excess / np.maximum(kink_tol, 1e-300))) if kink else None

        col = ad[:, k]
        fd_scale = float(np.max(np.abs(central))) if m else 0.0
        col_atol = rtol * fd_scale if atol is None else atol
        # NOTE: |C(h) - C(h/4)| is 15/16 of C(h)'s truncation error when it is
        # O(h^2) and 3/4 of it when only O(h) (C^1 but not C^2, e.g. x|x| at 0);
        # the factor 2 covers both.
        fd_err = delta / h + 2.0 * np.abs(central - central_q)
        err = np.abs(col - central)
        if kink:
            # NOTE: AD at a kink returns one of the one-sided derivatives (or a
            # subgradient between them); Richardson-extrapolated one-sided
            # differences (error O(h^2)) bound that interval.
            right = (4.0 * fwd_q - fwd) / 3.0
            left = (4.0 * bwd_q - bwd) / 3.0
            lo, hi = np.minimum(left, right), np.maximum(left, right)
            one_sided_err = 12.0 * delta / h + fd_err
            tol = col_atol + rtol * np.maximum(np.abs(lo), np.abs(hi)) + one_sided_err
            ok = (col >= lo - tol) & (col <= hi + tol)
        else:
            tol = col_atol + rtol * np.abs(central) + fd_err
            ok = err <= tol
        agree = bool(np.all(ok)) and bool(np.all(np.isfinite(col)))

        abs_err = float(np.max(err)) if m else 0.0
        checks.append(
            ColumnCheck(
                index=j,
                h=hp,
                abs_err=abs_err,
                rel_err=abs_err / fd_scale if fd_scale > 0 else (0.0 if abs_err == 0 else math.inf),
                agree=agree,
                kink=kink,
                kink_jump=float(np.max(jump)) if m else 0.0,
                kink_row=kink_row,
                fd_scale=fd_scale,
            )
        )

    notes = []
    if any(c.kink for c in checks):
        notes.append(
            "kink: fn is not differentiable at x along these inputs; AD returns one "
            "one-sided derivative there, and the central difference their average"
        )
    return FDReport(
        checks=checks,
        fd_dtype=str(np.dtype(fd_dtype)),
        fd_dtype_reason=reason,
        rtol=float(rtol),
        atol=atol,
        shape=(m, n),
        notes=notes,
    )


def _evaluator(
    fn: Callable[[Any], Any], x: Any
) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray, np.dtype, str]:
    """Choose the FD dtype and wrap ``fn`` as flat float array -> flat float64 array.

    Returns:
        ``(evaluate, x_flat, dtype, reason)`` where ``x_flat`` is a copy of x
        in ``dtype``.
    """
    is_torch = type(x).__module__.startswith("torch")
    if is_torch:
        import torch

        shape, device = tuple(x.shape), x.device
        native = np.dtype(str(x.dtype).removeprefix("torch."))
        x_np = x.detach().cpu().numpy().reshape(-1)

        def call(v: np.ndarray) -> Any:
            with torch.no_grad():
                return fn(torch.from_numpy(v.reshape(shape)).to(device))

        def out_dtype(y: Any) -> np.dtype | None:
            if not isinstance(y, torch.Tensor) or not y.is_floating_point():
                return None
            return np.dtype(str(y.dtype).removeprefix("torch."))

        def to_np(y: Any) -> np.ndarray:
            return y.detach().cpu().double().numpy().reshape(-1)

    else:
        shape = np.shape(x)
        x_np = np.asarray(x).reshape(-1)
        native = x_np.dtype if np.issubdtype(x_np.dtype, np.floating) else np.dtype(np.float64)

        def call(v: np.ndarray) -> Any:
            return fn(v.reshape(shape))

        def out_dtype(y: Any) -> np.dtype | None:
            a = np.asarray(y)
            return a.dtype if np.issubdtype(a.dtype, np.floating) else None

        def to_np(y: Any) -> np.ndarray:
            return np.asarray(y, dtype=np.float64).reshape(-1)

    dtype, reason = native, "x is float64"
    if native != np.float64:
        try:
            got = out_dtype(call(x_np.astype(np.float64)))
        except Exception as exc:  # fn may refuse float64 (float32 weights, MPS, ...)
            reason = f"fn refused a float64 input ({type(exc).__name__}); FD in {native}"
        else:
            if got == np.float64:
                dtype, reason = np.dtype(np.float64), "fn accepted a float64 copy of x"
            else:
                reason = f"fn returned {got} for a float64 input; FD in {native}"

    def evaluate(v: np.ndarray) -> np.ndarray:
        return to_np(call(v))

    return evaluate, x_np.astype(dtype, copy=True), np.dtype(dtype), reason


def _ad_block(
    ad_columns: Callable[[np.ndarray], np.ndarray] | np.ndarray,
    cols: list[int],
    m: int,
    n: int,
) -> tuple[np.ndarray, np.dtype]:
    """The AD columns ``J[:, cols]`` as float64 ``(m, len(cols))`` and their original dtype."""
    idx = np.asarray(cols, dtype=np.int64)
    if callable(ad_columns):
        block = _as_numpy(ad_columns(idx))
        if block.shape != (m, len(cols)):
            raise ValueError(
                f"fd_check: ad_columns(cols) returned shape {block.shape}, expected "
                f"(m, len(cols)) = {(m, len(cols))}"
            )
    else:
        full = _as_numpy(ad_columns)
        if full.shape != (m, n):
            raise ValueError(
                f"fd_check: ad_columns has shape {full.shape}, expected the full Jacobian "
                f"(m, n) = {(m, n)}; pass a callable to give only some columns"
            )
        block = full[:, idx]
    dtype = block.dtype if np.issubdtype(block.dtype, np.floating) else np.dtype(np.float64)
    return block.astype(np.float64), dtype


def _as_numpy(a: Any) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
