"""Check a stored result against torch's single-process references.

The reference is computed in ONE process, the way a user would without
jacpipe: ``torch.autograd.functional.jacobian`` (``hessian`` for Hessians, a
per-sample loop for batched results) on the whole matrix when it fits the
memory budget, else one ``torch.autograd.grad`` per sampled row.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import kind_of, layout_of
from pipeline.maths.kinds import maths_of, reference_full, reference_rows

if TYPE_CHECKING:
    from pipeline.problem.problem import Problem
    from pipeline.store.reader import JacobianResult

DEFAULT_RTOL = {"float32": 1e-5, "float64": 1e-10}
#: Batched results with more samples are checked on sampled rows unless ``--all``.
MAX_FULL_SAMPLES = 1000


@dataclass
class CompareReport:
    """The outcome of a comparison; ``ok`` decides the exit code."""

    out: str
    job: str
    shape: list[int]
    dtype: str
    rows_checked: int
    mode: str  # "all" or "sampled"
    max_abs_error: float
    max_rel_error: float
    worst_ratio: float  # max |a - b| / (atol + rtol |b|); <= 1 passes
    rtol: float
    atol: float
    reference_seconds: float
    pipeline_seconds: float | None
    nan: int
    inf: int
    problems: list[str] = field(default_factory=list)
    symmetry_error: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: "exact" (plain AD within rtol/atol), or "smoothed" / "stochastic": an
    #: estimate checked within its standard errors (``extra`` says how), where
    #: the plain tolerance rows mean nothing.
    check: str = "exact"

    @property
    def ok(self) -> bool:
        return not self.problems and self.worst_ratio <= 1.0

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), ok=self.ok)


def sample_rows(total: int, k: int, seed: int = 0) -> Any:
    """``k`` distinct rows, the first and last included, sorted."""
    import numpy as np

    if k >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    picked = set(rng.choice(total, size=max(k - 2, 0), replace=False).tolist()) | {0, total - 1}
    return np.array(sorted(picked)[:k], dtype=np.int64)


def errors(got: Any, ref: Any, *, rtol: float, atol: float) -> tuple[float, float, float]:
    """``(max_abs, max_rel, worst_ratio)`` of ``got`` against ``ref``; NaNs must match."""
    import numpy as np

    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        raise JacpipeError(f"shape mismatch: result {got.shape}, reference {ref.shape}")
    if got.size == 0:
        return 0.0, 0.0, 0.0
    got, ref = got.reshape(-1), ref.reshape(-1)
    max_abs = scale = worst = 0.0
    # Blocks of 64k entries: each temporary stays in cache (a 2000 x 2000 check
    # took 0.58 s in whole-array passes; every maximum is per entry, so exact).
    for start in range(0, got.size, _ERROR_BLOCK):
        g = np.asarray(got[start:start + _ERROR_BLOCK], dtype=np.float64)
        r = np.asarray(ref[start:start + _ERROR_BLOCK], dtype=np.float64)
        both_nan = np.isnan(g) & np.isnan(r)
        same_inf = np.isinf(g) & (g == r)
        # NaN/Inf arithmetic (inf - inf, 0 / 0) is expected here, not a warning.
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            diff = np.where(both_nan | same_inf, 0.0, np.abs(g - r))
            diff = np.where(np.isnan(diff), np.inf, diff)
            finite_ref = np.abs(np.where(np.isfinite(r), r, 0.0))
            scale = max(scale, float(finite_ref.max()))
            max_abs = max(max_abs, float(diff.max()))
            # An exact match passes even where the tolerance is 0 (a zero reference, atol 0).
            tol = atol + rtol * finite_ref
            worst = max(worst, float(np.where(diff == 0, 0.0, diff / tol).max()))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, max_rel, worst


_ERROR_BLOCK = 1 << 16


def explain_nan_differences(got: Any, ref: Any) -> tuple[Any, str]:
    """Accept NaN positions that differ only as ``0 * NaN`` does between AD modes.

    NOTE: [NaN where one mode multiplies 0 by NaN]
        Where a local derivative is not finite (``sqrt`` at 0, ``0 / 0``),
        reverse mode multiplies the zero cotangents of the other rows by it
        and gets NaN in entries that forward mode (or another row order)
        gives as 0, and the other way round: both are what autograd computes
        in that mode. Entries that are NaN on one side and exactly 0 on the
        other are therefore taken as matching, and counted in the report;
        any other NaN difference stays a mismatch.

    Args:
        got: the stored rows.
        ref: the reference rows, same shape.

    Returns:
        ``got`` with those entries set to ``ref``'s, and a note (empty if none).
    """
    import numpy as np

    got = np.asarray(got)
    ref = np.asarray(ref)
    if got.shape != ref.shape:
        return got, ""
    one_nan = np.isnan(got) != np.isnan(ref)
    zero_vs_nan = one_nan & ((got == 0) | (ref == 0))
    if not zero_vs_nan.any() or (one_nan & ~zero_vs_nan).any():
        return got, ""
    got = np.where(zero_vs_nan, ref, got)
    i, j = np.argwhere(zero_vs_nan)[0]
    return got, (
        f"{int(zero_vs_nan.sum())} entries are NaN on one side and 0 on the other (first at "
        f"checked row {int(i)}, column {int(j)}): a non-finite local derivative times 0 gives "
        "NaN in one AD mode and 0 in the other; taken as matching"
    )


def disagreements(got: Any, ref: Any, *, rows: Any, rtol: float, atol: float, k: int = 3) -> str:
    """The ``k`` worst entries outside the tolerance, as ``J[row, col] = got vs ref``."""
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(got - ref)
        diff = np.where(np.isnan(got) & np.isnan(ref), 0.0, np.where(np.isnan(diff), np.inf, diff))
        ratio = diff / (atol + rtol * np.abs(np.where(np.isfinite(ref), ref, 0.0)))
    ratio = np.where(diff == 0, 0.0, ratio)
    bad = np.flatnonzero(ratio.reshape(-1) > 1.0)
    worst = bad[np.argsort(-ratio.reshape(-1)[bad], kind="stable")[:k]]
    shown = []
    for flat in worst:
        i, j = divmod(int(flat), got.shape[1])
        shown.append(f"J[{int(rows[i])}, {j}] = {got[i, j]:.6g} vs {ref[i, j]:.6g}")
    more = f" (+{len(bad) - len(worst)} more)" if len(bad) > len(worst) else ""
    return f"{len(bad)} entries: " + "; ".join(shown) + more


def outside_pattern(stored: Any, ref: Any, rows: Any) -> list[tuple[int, int, float]]:
    """Entries ``(row, col, value)`` where the dense reference is nonzero but the
    stored sparse rows have no entry (the pattern missed them).

    Args:
        stored: CSR of the checked rows, in the order of ``rows``.
        ref: dense reference of the same rows.
        rows: the flat row index of each checked row.
    """
    import numpy as np
    import scipy.sparse as sp

    structure = sp.csr_matrix(
        (np.ones(len(stored.indices), dtype=bool), stored.indices, stored.indptr),
        shape=stored.shape,
    ).toarray()
    hit = np.argwhere((np.abs(np.nan_to_num(ref)) > 0) & ~structure)
    return [(int(rows[i]), int(j), float(ref[i, j])) for i, j in hit]


#: The whole reference is computed where three copies of it fit this many bytes.
DEFAULT_BUDGET = 2 * 2**30


def compare(
    out: str,
    *,
    rows: int | None = None,
    all_rows: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    memory_budget: int = DEFAULT_BUDGET,
    seed: int = 0,
    job: str | None = None,
    trust_job: bool = False,
    problem: Problem | None = None,
    reference: tuple[Any, float] | None = None,
) -> CompareReport:
    """Compare a result folder against the single-process torch reference.

    Args:
        out: result folder.
        rows: check this many sampled rows (one ``autograd.grad`` each).
        all_rows: compute the whole reference with ``autograd.functional``.
        rtol: relative tolerance (default 1e-5 float32, 1e-10 float64).
        atol: absolute tolerance (default ``rtol * max|reference|``).
        memory_budget: the whole reference is used only if it fits this.
        job, trust_job: allow rebuilding a ``module:function`` job (see :func:`rebuilt`).
        problem: the :class:`~pipeline.Problem` itself (a result of
            ``pipeline.run(problem)``); checked against the stored fingerprint.
        reference: ``(reference_full(problem), seconds)`` already computed for
            ``problem`` (NOTE: [The reference while Ray starts]); used where
            every row is checked.

    NaN and Inf entries of the result match only the same NaN / Inf of the
    reference at the same place (torch gives them too where the maths is not
    finite); their counts are in ``nan``/``inf`` and, for the checked rows, in
    ``extra``.

    Raises:
        JacpipeError: not a result, or the job cannot be rebuilt identically.
    """
    for name, value in (("--rtol", rtol), ("--atol", atol)):
        if value is not None and not value >= 0:
            raise JacpipeError(f"{name} must be >= 0, got {value}")
    from pipeline.store.reader import open_jacobian

    result = open_jacobian(out)
    broken = result.check(checksums=True)
    problems = [str(p) for p in broken]
    problem = (rebuilt(result, job=job, trust_job=trust_job) if problem is None
               else _checked_given(result, problem))
    bad = {p.index for p in broken}
    good = [s for s in result.committed if s.index not in bad]
    if result.manifest.smoothing is not None:
        return compare_smoothed(result, problem, good, problems, rows=rows, all_rows=all_rows,
                                rtol=rtol, memory_budget=memory_budget, seed=seed)
    if (problem.operator or {}).get("samples"):
        return compare_stochastic(result, problem, good, problems, rows=rows, all_rows=all_rows,
                                  rtol=rtol, memory_budget=memory_budget, seed=seed)
    t0 = time.perf_counter()
    if (all_rows or (rows is None and _fits(result, memory_budget))) and not problems:
        mode, idx = "all", None
        if reference is not None and getattr(reference[0], "shape", None) == result.shape:
            ref, ref_seconds = reference
        else:
            ref = reference_full(problem)
            ref_seconds = time.perf_counter() - t0
        got = result.read(slice(None), verify=False, as_="numpy")  # rows, not the tensor
    else:
        mode = "sampled"
        idx = _sampled_rows(good, rows, seed)
        ref = reference_rows(problem, idx)
        ref_seconds = time.perf_counter() - t0
        got = result.read(idx, verify=False, as_="numpy") if len(idx) else ref
    r = rtol if rtol is not None else DEFAULT_RTOL[result.dtype]
    a = atol if atol is not None else r * _finite_max(ref)
    got, nan_note = explain_nan_differences(got, ref)
    max_abs, max_rel, worst = errors(got, ref, rtol=r, atol=a)
    extra: dict[str, Any] = {}
    problems += _pattern_problems(result, got, ref, idx, extra)
    _nonfinite_counts(result, got, ref, extra)
    if nan_note:
        extra["NaN positions that differ"] = nan_note
    if worst > 1.0:
        import numpy as np

        rows_of = np.arange(len(got)) if idx is None else np.asarray(idx)
        extra["where they disagree"] = disagreements(got, ref, rows=rows_of, rtol=r, atol=a)
    man = result.manifest
    return CompareReport(
        out=result.storage.display,
        job=man.job,
        shape=list(result.shape),
        dtype=result.dtype,
        rows_checked=int(len(got)),
        mode=mode,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        worst_ratio=worst,
        rtol=r,
        atol=a,
        reference_seconds=round(ref_seconds, 4),
        pipeline_seconds=man.compute_seconds,
        nan=man.nan,
        inf=man.inf,
        problems=problems,
        symmetry_error=_symmetry_error(result, got, idx),
        extra=extra,
    )


def compare_smoothed(
    result: JacobianResult, problem: Problem, good: list[Any], problems: list[str], *,
    rows: int | None, all_rows: bool, rtol: float | None, memory_budget: int, seed: int,
) -> CompareReport:
    """A smoothed result against an independent Monte Carlo run (another seed), and plain AD.

    NOTE: the reference draws its perturbations with seed ``seed + 1`` of the
    stored run's (independent samples, same K) and differentiates each
    perturbed point with plain autograd in one process; an entry passes when
    the two estimates differ by at most ``z`` combined standard errors
    (``z`` from :func:`pipeline.maths.smoothing.agreement_z`) plus ``rtol``
    rounding. The bias reported is against the plain AD Jacobian at ``x``.
    """
    import numpy as np

    from pipeline.analysis import smoothing as reading
    from pipeline.maths import smoothing as sm

    smoothing = result.manifest.smoothing
    full = (all_rows or (rows is None and _fits(result, memory_budget))) and not problems
    idx = (np.arange(result.shape[0]) if full else _sampled_rows(good, rows, seed)).astype(np.int64)
    t0 = time.perf_counter()
    ref = sm.reference_rows(problem, smoothing.with_seed(smoothing.seed + 1), idx)
    ref_seconds = time.perf_counter() - t0
    got = {c: (result.read(idx, verify=False, as_="numpy") if c == "values"
               else reading.read_column(result, c, idx)) for c in smoothing.columns}
    r = rtol if rtol is not None else DEFAULT_RTOL[result.dtype]
    check = sm.check_against(got, ref, reference_rows(problem, idx), idx, rtol=r)
    bias, brow, bcol = check.bias
    extra: dict[str, Any] = {
        "smoothing": reading.describe(smoothing),
        "reference": f"independent Monte Carlo, seed {smoothing.seed + 1}, plain autograd",
        "worst |diff| / combined stderr": f"{check.worst_z:.2f} (threshold {check.z:.2f})",
        "stderr max / median": f"{check.max_stderr:.3e} / {check.median_stderr:.3e}",
        "bias vs plain AD (max |smoothed - AD|)": f"{bias:.4g} at J[{brow}, {bcol}]",
    }
    if check.zeroth_z is not None:
        extra["first vs zeroth order (max |diff| / stderr)"] = f"{check.zeroth_z:.2f}"
        if check.zeroth_z > check.z:
            extra["note"] = ("the two estimators disagree beyond their error bars: f may be "
                             "discontinuous near x, where the first-order estimate is biased")
    man = result.manifest
    return CompareReport(
        out=result.storage.display, job=man.job, shape=list(result.shape), dtype=result.dtype,
        rows_checked=len(idx), mode="all" if full else "sampled", max_abs_error=check.max_abs,
        max_rel_error=check.max_abs / max(_finite_max(ref["values"]), 1e-300),
        worst_ratio=check.worst_ratio, rtol=r, atol=check.atol,
        reference_seconds=round(ref_seconds, 4), pipeline_seconds=man.compute_seconds,
        nan=man.nan, inf=man.inf, problems=problems, extra=extra, check="smoothed",
    )


#: A stochastic estimate fails when an entry is this many standard errors off...
GROSS_Z = 10.0
#: ... or when more than this share of its entries is beyond 3 standard errors.
OUTSIDE_3SE = 0.05


def compare_stochastic(
    result: JacobianResult, problem: Problem, good: list[Any], problems: list[str], *,
    rows: int | None, all_rows: bool, rtol: float | None, memory_budget: int, seed: int,
) -> CompareReport:
    """A stochastic per-point estimate against the exact operator, within its standard errors.

    NOTE: [Checking an estimate]
        The reference is the exact operator by nested ``torch.func`` at the
        sampled points, and ``z = |estimate - exact| / stderr`` per entry
        (an entry within ``atol = rtol * max |exact|`` counts as ``z = 0``:
        Rademacher directions give a diagonal Hessian's trace exactly, with
        stderr 0). A Hutchinson or STDE estimate from S directions has
        heavier tails than a normal's (its standard error is estimated from
        the same S draws: measured 6.1 standard errors once in 200 points at
        D = 50, S = 64), so a Bonferroni bound on the largest ``z`` would
        fail correct results. The check is the one that catches wrong
        maths: at most 5% of the entries beyond 3 standard errors (a normal
        puts 0.27% there; a wrong scale or sign moves most of them) and none
        beyond :data:`GROSS_Z` (a gross error in one point).
    """
    import numpy as np

    from pipeline.analysis.smoothing import read_column

    full = (all_rows or (rows is None and _fits(result, memory_budget))) and not problems
    idx = (np.arange(result.shape[0]) if full else _sampled_rows(good, rows, seed)).astype(np.int64)
    t0 = time.perf_counter()
    ref = reference_rows(problem, idx)
    ref_seconds = time.perf_counter() - t0
    got = result.read(idx, verify=False, as_="numpy").reshape(len(idx), -1)
    se = read_column(result, "stderr", idx).reshape(len(idx), -1)
    r = rtol if rtol is not None else DEFAULT_RTOL[result.dtype]
    a = r * max(_finite_max(ref), 1e-300)
    diff = np.abs(got - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        zs = np.where(diff <= a, 0.0, diff / np.maximum(se, 1e-300))
    outside = float((zs > 3).mean()) if zs.size else 0.0
    worst = max(float(zs.max(initial=0.0)) / GROSS_Z, outside / OUTSIDE_3SE)
    man = result.manifest
    return CompareReport(
        out=result.storage.display, job=man.job, shape=list(result.shape), dtype=result.dtype,
        rows_checked=len(idx), mode="all" if full else "sampled",
        max_abs_error=float(diff.max(initial=0.0)),
        max_rel_error=float(diff.max(initial=0.0) / max(_finite_max(ref), 1e-300)),
        worst_ratio=worst, rtol=r, atol=a,
        reference_seconds=round(ref_seconds, 4), pipeline_seconds=man.compute_seconds,
        nan=man.nan, inf=man.inf, problems=problems, check="stochastic",
        extra={
            "estimate": (f"stochastic, {problem.operator['samples']} directions per point, "
                         f"seed {problem.operator.get('seed', 0)}"),
            "reference": "exact operator by nested torch.func",
            "worst |diff| / stderr": f"{float(zs.max(initial=0.0)):.2f} (at most {GROSS_Z:g})",
            "within 3 standard errors": f"{100 * (1 - outside):.1f}% of entries (at least "
                                        f"{100 * (1 - OUTSIDE_3SE):g}%)",
            "stderr max / median": f"{float(se.max(initial=0.0)):.3e} / "
                                   f"{float(np.median(se)) if se.size else 0.0:.3e}",
        },
    )


def rebuilt(result: JacobianResult, *, job: str | None = None, trust_job: bool = False) -> Any:
    """The stored result's problem, built again and checked against its fingerprint.

    NOTE: [Reading never runs stored code]
        The manifest names the job that computed the result, and anyone who
        can write the folder can edit it (``os:system`` with a ``command``
        parameter). A built-in job (``jobs/<name>.py``) is code shipped with
        jacpipe and is rebuilt by name; a ``module:function`` job is imported
        and called only when the user names the same spec now (``--job``,
        or ``run --verify`` of that job) or passes ``--trust-job``. Specs are
        validated as dotted names before any import.

    Args:
        result: the opened result.
        job: the job spec the user gives now; must equal the stored one.
        trust_job: import and run the stored ``module:function`` job as it is.

    Raises:
        JacpipeError: a ``module:function`` job that was not named or trusted,
            or the job now builds a different problem.
    """
    from pipeline.core.fingerprint import FingerprintMismatch
    from pipeline.problem.problem import rebuild, split_spec

    man = result.manifest
    if man.job.startswith("python:"):
        raise JacpipeError(
            f"{result.storage.display} was computed from a Problem built in Python "
            f"({man.job.removeprefix('python:')}); nothing on disk can rebuild it: compare "
            "it in Python with pipeline.compare_result(OUT, problem=problem)"
        )
    split_spec(man.job)  # a dotted name or a built-in job, before anything is imported
    if ":" in man.job and not trust_job and job != man.job:
        named = "" if job is None else f" (--job {job} names another)"
        raise JacpipeError(
            f"{result.storage.display} was computed by job {man.job!r}{named}; rebuilding the "
            "reference would import and run that code, which the result folder names: pass "
            f"--job {man.job} to confirm it, or --trust-job"
        )
    try:
        return rebuild(man.job, man.params, man.fingerprint)
    except FingerprintMismatch as exc:
        why = str(exc).removeprefix("nondeterministic job: ")
        raise JacpipeError(
            f"{result.storage.display}: job {man.job!r} now builds a different problem than "
            f"the one stored (differs in: {exc.field}; {why}); "
            "rerun `jacpipe run` to recompute the result"
        ) from None


def _checked_given(result: JacobianResult, problem: Problem) -> Any:
    """A Problem handed to :func:`compare`, checked against the stored fingerprint."""
    from pipeline.core.fingerprint import FingerprintMismatch, check_fingerprint
    from pipeline.problem.problem import fingerprint, validate

    try:
        check_fingerprint(result.manifest.fingerprint,
                          fingerprint(problem, validate(problem, "problem")))
    except FingerprintMismatch as exc:
        raise JacpipeError(
            f"{result.storage.display}: the Problem given is not the one stored (differs in: "
            f"{exc.field}); give the problem the result was computed from"
        ) from None
    return problem


def _fits(result: JacobianResult, memory_budget: int) -> bool:
    """Whether the whole reference fits (and, per sample, is not too slow)."""
    return fits_full_reference(result.shapes, memory_budget)


def fits_full_reference(shapes: Any, memory_budget: int = DEFAULT_BUDGET) -> bool:
    """Whether :func:`compare` checks every row of a result of these shapes by default."""
    fits = shapes.total_rows * shapes.n * shapes.itemsize * 3 <= memory_budget
    if kind_of(shapes.kind).per_sample:
        # The per-sample reference loop costs one autograd.functional.jacobian
        # per sample (~10 ms for robot_arm): beyond a few thousand, sample rows.
        fits = fits and (shapes.batch or 0) <= MAX_FULL_SAMPLES
    return fits


def _sampled_rows(good: list[Any], rows: int | None, seed: int) -> Any:
    import numpy as np

    k = rows if rows is not None else 64
    if k < 1:
        raise JacpipeError(f"--rows must be at least 1, got {k}")
    good_rows = np.concatenate(
        [np.arange(s.start, s.stop) for s in good] or [np.zeros(0, np.int64)]
    )
    return good_rows[sample_rows(len(good_rows), k, seed)] if len(good_rows) else good_rows


def _finite_max(ref: Any) -> float:
    import numpy as np

    finite = np.abs(ref[np.isfinite(ref)])
    return float(finite.max()) if finite.size else 1.0


def _symmetry_error(result: JacobianResult, got: Any, idx: Any) -> float | None:
    """max |H[R, R] - H[R, R]^T| over the checked rows R of a Hessian, else None.

    NOTE: the stored rows R hold H[R, :]; both H[i, j] and H[j, i] are among
    them only for i, j in R, so the symmetry error is taken on the principal
    sub-block H[R, R] (all of H when every row is checked).
    """
    import numpy as np

    if not kind_of(result.shapes.kind).symmetric or not len(got):
        return None
    cols = np.arange(result.shape[0]) if idx is None else idx
    sub = got[:, cols]
    return float(np.abs(sub - sub.T).max())


def _pattern_problems(result: JacobianResult, got: Any, ref: Any, idx: Any, extra: dict[str, Any]
                      ) -> list[str]:
    """A sparse result's colour count, and reference nonzeros its pattern missed."""
    import numpy as np

    if layout_of(result.layout).fixed_width or not len(got):
        return []
    idx = np.arange(result.shape[0]) if idx is None else idx
    outside = outside_pattern(result.read(idx, as_="scipy", verify=False), ref, idx)
    coloring = result.manifest.coloring or {}
    extra["colours"] = f"{coloring.get('num_colors')} ({coloring.get('mode')} mode)"
    if not outside:
        return []
    shown = ", ".join(f"J[{i}, {j}] = {v:.3g}" for i, j, v in outside[:5])
    return [
        f"the sparsity pattern is too sparse: {len(outside)} nonzero entries of the "
        f"reference lie outside it ({shown}{', ...' if len(outside) > 5 else ''}); "
        "the compressed evaluation folded them into other entries"
    ]


def _nonfinite_counts(result: JacobianResult, got: Any, ref: Any, extra: dict[str, Any]) -> None:
    """NOTE: non-finite entries are compared, not skipped: a NaN passes only
    where the reference has a NaN, an Inf only where it has the same Inf (see
    :func:`errors`). The counts are shown so they never pass silently.
    """
    import numpy as np

    man = result.manifest
    if man.nan or man.inf or not np.isfinite(ref).all():
        extra["NaN / Inf in checked rows (result | reference)"] = (
            f"{int(np.isnan(got).sum())} / {int(np.isinf(got).sum())} | "
            f"{int(np.isnan(ref).sum())} / {int(np.isinf(ref).sum())}"
        )


# ---------------------------------------------------------------------------
# Finite differences against the stored AD columns
# ---------------------------------------------------------------------------


def fd_report(
    out: str, *, columns: int = 16, sample: int = 0, seed: int = 0, job: str | None = None,
    trust_job: bool = False,
) -> Any:
    """Finite differences on sampled input columns against the stored AD columns.

    Also flags inputs along which ``fn`` has a kink at ``x`` (see
    :func:`pipeline.maths.fd.fd_check` for the step sizes and the error model).

    Args:
        out: result folder.
        columns: how many input columns to check (all when ``n`` is smaller).
        sample: for batched results, which sample to check.
        seed: seed of the column sample.
        job, trust_job: allow rebuilding a ``module:function`` job (see :func:`rebuilt`).

    Returns:
        A :class:`pipeline.maths.fd.FDReport`.

    Raises:
        JacpipeError: not a result, a bad option, or the job builds differently now.
    """
    import numpy as np

    from pipeline.maths.fd import fd_check, sample_columns
    from pipeline.store.reader import open_jacobian

    result = open_jacobian(out)
    problem = rebuilt(result, job=job, trust_job=trust_job)
    shapes = result.shapes
    if columns < 1:
        raise JacpipeError(f"--fd-columns must be at least 1, got {columns}")
    kind = kind_of(shapes.kind)
    rows = None
    if kind.per_sample:
        if not 0 <= sample < (shapes.batch or 0):
            raise JacpipeError(f"--sample {sample}: the result has {shapes.batch} samples")
        rows = np.arange(sample * shapes.m, (sample + 1) * shapes.m)
    fn, x = maths_of(shapes.kind).differentiated(problem, sample)

    def ad_columns(wanted: Any) -> Any:
        wanted = np.asarray(wanted, dtype=np.int64)
        if not layout_of(result.layout).fixed_width:
            return result.read(rows, as_="scipy")[:, wanted].toarray()
        parts = [block[:, wanted] for _, block in result.iter_blocks(rows)]
        return np.concatenate(parts) if parts else np.zeros((0, len(wanted)))

    report = fd_check(fn, x, ad_columns, sample_columns(shapes.n, columns, seed=seed))
    if (report.nonsmooth_inputs and kind_of(shapes.kind).smoothable
            and result.manifest.smoothing is None):
        from pipeline.analysis.smoothing import suggestion

        report.notes.append(suggestion(result.manifest.job, result.manifest.params, x,
                                       report.nonsmooth_inputs))
    return report
