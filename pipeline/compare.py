"""Check a stored result against torch's single-process references.

The reference is computed in ONE process, the way a user would without
jacpipe: ``torch.autograd.functional.jacobian`` (``hessian`` for Hessians, a
per-sample loop for batched results) on the whole matrix when it fits the
memory budget, else one ``torch.autograd.grad`` per sampled row.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import JacpipeError

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

    @property
    def ok(self) -> bool:
        return not self.problems and self.worst_ratio <= 1.0

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), ok=self.ok)


def reference_rows(problem: Any, rows: Any) -> Any:
    """Rows of the derivative by plain autograd, in one process.

    Jacobian rows: one ``autograd.grad`` per row; Hessian rows: one
    ``autograd.grad`` of the gradient (built with ``create_graph``) per row;
    batched rows: ``torch.autograd.functional.jacobian`` of each sample that
    the rows touch (a per-sample loop, never the ``B²`` cross terms).

    Args:
        problem: a :class:`pipeline.Problem`.
        rows: flat row indices (numpy int array).

    Returns:
        numpy array ``(len(rows), n)``.
    """
    import numpy as np
    import torch

    kind = problem.kind
    out = []
    if kind == "batched":
        from torch.autograd.functional import jacobian

        xs = problem.x
        n = xs[0].numel()
        m = problem.fn(xs[0]).numel()
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        result = np.empty((len(rows), n), dtype=xs.detach().cpu().numpy().dtype)
        for b in np.unique(rows // m):
            here = np.flatnonzero(rows // m == b)
            jac = jacobian(problem.fn, xs[int(b)].detach()).reshape(m, n)
            result[here] = jac[torch.as_tensor(rows[here] % m)].detach().cpu().numpy()
        return result
    x = problem.x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if kind == "hessian":
            (grad,) = torch.autograd.grad(problem.fn(x).reshape(()), x, create_graph=True)
            y = grad.reshape(-1)
        else:
            y = problem.fn(x).reshape(-1)
    for r in rows:
        (g,) = torch.autograd.grad(y[int(r)], x, retain_graph=True, allow_unused=True)
        out.append(torch.zeros_like(x).reshape(-1) if g is None else g.reshape(-1))
    return torch.stack(out).detach().cpu().numpy() if out else np.zeros((0, x.numel()))


def reference_full(problem: Any) -> Any:
    """The whole derivative with torch's one-process functions, as numpy ``(rows, n)``."""
    import torch
    from torch.autograd.functional import hessian, jacobian

    if problem.kind == "hessian":
        h = hessian(lambda t: problem.fn(t).reshape(()), problem.x)
        return h.reshape(problem.x.numel(), -1).detach().cpu().numpy()
    if problem.kind == "batched":
        blocks = [
            jacobian(problem.fn, problem.x[b]).reshape(-1, problem.x[b].numel())
            for b in range(problem.x.shape[0])
        ]
        return torch.cat(blocks).detach().cpu().numpy()
    j = jacobian(problem.fn, problem.x)
    return j.reshape(-1, problem.x.numel()).detach().cpu().numpy()


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

    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise JacpipeError(f"shape mismatch: result {got.shape}, reference {ref.shape}")
    both_nan = np.isnan(got) & np.isnan(ref)
    same_inf = np.isinf(got) & (got == ref)
    # NaN/Inf arithmetic (inf - inf, 0 / 0) is expected here, not a warning.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        diff = np.where(both_nan | same_inf, 0.0, np.abs(got - ref))
        diff = np.where(np.isnan(diff), np.inf, diff)
        if diff.size == 0:
            return 0.0, 0.0, 0.0
        finite_ref = np.abs(np.where(np.isfinite(ref), ref, 0.0))
        scale = float(finite_ref.max()) if finite_ref.size else 0.0
        max_abs = float(diff.max())
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        # An exact match passes even where the tolerance is 0 (a zero reference, atol 0).
        tol = atol + rtol * finite_ref
        worst = float(np.where(diff == 0, 0.0, diff / tol).max())
    return max_abs, max_rel, worst


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


def compare(
    out: str,
    *,
    rows: int | None = None,
    all_rows: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    memory_budget: int = 2 * 2**30,
    seed: int = 0,
) -> CompareReport:
    """Compare a result folder against the single-process torch reference.

    Args:
        out: result folder.
        rows: check this many sampled rows (one ``autograd.grad`` each).
        all_rows: compute the whole reference with ``autograd.functional``.
        rtol: relative tolerance (default 1e-5 float32, 1e-10 float64).
        atol: absolute tolerance (default ``rtol * max|reference|``).
        memory_budget: the whole reference is used only if it fits this.

    NaN and Inf entries of the result match only the same NaN / Inf of the
    reference at the same place (torch gives them too where the maths is not
    finite); their counts are in ``nan``/``inf`` and, for the checked rows, in
    ``extra``.

    Raises:
        JacpipeError: not a result, or the job cannot be rebuilt identically.
    """
    import numpy as np

    from pipeline.problem import build_problem, check_fingerprint, fingerprint, validate
    from pipeline.store import open_jacobian

    for name, value in (("--rtol", rtol), ("--atol", atol)):
        if value is not None and not value >= 0:
            raise JacpipeError(f"{name} must be >= 0, got {value}")
    result = open_jacobian(out)
    man = result.manifest
    broken = result.check(checksums=True)
    problems = [str(p) for p in broken]
    problem = build_problem(man["job"], man["params"])
    shapes = validate(problem, man["job"])
    try:
        check_fingerprint(man["fingerprint"], fingerprint(problem, shapes))
    except JacpipeError as exc:
        raise JacpipeError(
            f"{result.storage.display}: job {man['job']!r} now builds a different problem than "
            f"the one stored ({str(exc).removeprefix('nondeterministic job: ')}); "
            "rerun `jacpipe run` to recompute the result"
        ) from None
    total, n = result.shape
    itemsize = 4 if result.dtype == "float32" else 8
    fits = total * n * itemsize * 3 <= memory_budget
    if man["kind"] == "batched":
        # The per-sample reference loop costs one autograd.functional.jacobian
        # per sample (~10 ms for robot_arm): beyond a few thousand, sample rows.
        fits = fits and (shapes.batch or 0) <= MAX_FULL_SAMPLES
    bad = {p.index for p in broken}
    good_rows = np.concatenate(
        [np.arange(s["start"], s["stop"]) for s in result.committed if s["index"] not in bad]
        or [np.zeros(0, np.int64)]
    )
    t0 = time.perf_counter()
    if (all_rows or (rows is None and fits)) and not problems:
        mode = "all"
        ref = reference_full(problem)
        ref_seconds = time.perf_counter() - t0
        got = result.read(verify=False, as_="numpy").reshape(total, n)
        checked = total
    else:
        mode = "sampled"
        k = rows if rows is not None else 64
        if k < 1:
            raise JacpipeError(f"--rows must be at least 1, got {k}")
        pick = good_rows[sample_rows(len(good_rows), k, seed)] if len(good_rows) else good_rows
        ref = reference_rows(problem, pick)
        ref_seconds = time.perf_counter() - t0
        got = result.read(pick, verify=False, as_="numpy") if len(pick) else ref
        checked = len(pick)
    r = rtol if rtol is not None else DEFAULT_RTOL[result.dtype]
    finite = np.abs(ref[np.isfinite(ref)])
    a = atol if atol is not None else r * (float(finite.max()) if finite.size else 1.0)
    max_abs, max_rel, worst = errors(got, ref, rtol=r, atol=a)
    symmetry = None
    if man["kind"] == "hessian" and checked:
        # NOTE: the stored rows R hold H[R, :]; both H[i, j] and H[j, i] are
        # among them only for i, j in R, so the symmetry error is taken on the
        # principal sub-block H[R, R] (all of H when every row is checked).
        idx = np.arange(total) if mode == "all" else pick
        sub = got[:, idx]
        symmetry = float(np.abs(sub - sub.T).max())
    extra: dict[str, Any] = {}
    if result.layout == "sparse" and checked:
        idx = np.arange(total) if mode == "all" else pick
        outside = outside_pattern(result.read(idx, as_="scipy", verify=False), ref, idx)
        coloring = man.get("coloring", {})
        extra["colours"] = f"{coloring.get('num_colors')} ({coloring.get('mode')} mode)"
        if outside:
            shown = ", ".join(f"J[{i}, {j}] = {v:.3g}" for i, j, v in outside[:5])
            problems.append(
                f"the sparsity pattern is too sparse: {len(outside)} nonzero entries of the "
                f"reference lie outside it ({shown}{', ...' if len(outside) > 5 else ''}); "
                "the compressed evaluation folded them into other entries"
            )
    nan = sum(int(s.get("nan", 0)) for s in result.committed)
    inf = sum(int(s.get("inf", 0)) for s in result.committed)
    if nan or inf or not np.isfinite(ref).all():
        # NOTE: non-finite entries are compared, not skipped: a NaN passes only
        # where the reference has a NaN, an Inf only where it has the same Inf
        # (see `errors`). The counts are shown so they never pass silently.
        extra["NaN / Inf in checked rows (result | reference)"] = (
            f"{int(np.isnan(got).sum())} / {int(np.isinf(got).sum())} | "
            f"{int(np.isnan(ref).sum())} / {int(np.isinf(ref).sum())}"
        )
    return CompareReport(
        out=result.storage.display,
        job=man["job"],
        shape=[total, n],
        dtype=result.dtype,
        rows_checked=int(checked),
        mode=mode,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        worst_ratio=worst,
        rtol=r,
        atol=a,
        reference_seconds=round(ref_seconds, 4),
        pipeline_seconds=man.get("compute_seconds"),
        nan=nan,
        inf=inf,
        problems=problems,
        symmetry_error=symmetry,
        extra=extra,
    )
