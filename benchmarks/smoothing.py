"""Randomized smoothing (issue 17): error bars against K, wall time on Ray, sigma -> 0.

(1) Standard error against K, both estimators, in one process (the worker's
    code path, :func:`pipeline.maths.smoothing.smoothed_blocks` over the engine's
    rows): on ``contact`` at its kink (sigma 0.01) and on a small relu
    ``mlp`` (sigma 0.1). Reported: the max and median standard error over
    the entries, and the log-log slope of the mean against K (Monte Carlo:
    -0.5). Target: the slope within 0.1 of -0.5 for every job and estimator.
    NOTE: the max is a noisy statistic of heavy-tailed samples (contact's
    zeroth order: the friction's tanh(vy / 0.01) seen with sigma 0.01), so
    the slope is fitted to the mean over entries.
(2) Wall time of ``jacpipe run --smooth`` against K on an embedded Ray
    (2 CPUs, 2 shards), and of the plain run of the same job for scale.
(3) sigma -> 0 on a smooth job (``mlp`` with tanh, float64): max |J_s - J|
    against the plain AD Jacobian, K = 64, both estimators. The first-order
    bias of a smooth f is O(sigma^2) (odd Taylor terms cancel), so it must
    fall with sigma; the zeroth-order estimate's variance stays bounded as
    sigma -> 0 thanks to the antithetic pairs (NOTE: [Antithetic pairs]).
    Target: the first-order max |J_s - J| at the smallest sigma below 1e-6.

    python -m benchmarks.smoothing            # ~1 minute on 2 busy cores
    python -m benchmarks.smoothing --quick    # a few seconds
"""

from __future__ import annotations

import math
import tempfile
import time

import numpy as np

from benchmarks.harness import Report, Target, parser

JOBS = {
    "contact": ({}, 0.01),
    "mlp": ({"n": 20, "m": 10, "hidden": 16, "activation": "relu", "dtype": "float64"}, 0.1),
}
SMOOTH_MLP = {"n": 20, "m": 10, "hidden": 16, "activation": "tanh", "dtype": "float64"}


def _problem(job: str, params: dict):
    from pipeline.problem import build_problem

    return build_problem(job, params)


def smoothed(problem, smoothing) -> dict[str, np.ndarray]:
    """The smoothed Jacobian of ``problem`` in one process, by the worker's code path."""
    from pipeline.maths import maths_of
    from pipeline.maths.smoothing import smoothed_blocks

    rows = maths_of(problem.kind).rows
    m = problem.fn(problem.x).numel()

    def rows_at(point, a, b):
        return np.concatenate([blk.detach().numpy() for _, blk in
                               rows(problem.fn, point, a, b, chunk_size=b - a, method="rev")])

    blocks = list(smoothed_blocks(problem.fn, problem.x, smoothing, rows_at, 0, m, chunk=m))
    return {k: np.concatenate([c[k] for _, c in blocks]) for k in smoothing.columns}


def stderr_vs_k(report: Report, ks: list[int]) -> None:
    from pipeline.core.smoothing import parse_smooth

    rows, slopes = [], []
    for job, (params, sigma) in JOBS.items():
        problem = _problem(job, params)
        for estimator in ("first", "zeroth"):
            means = []
            for k in ks:
                got = smoothed(problem, parse_smooth(sigma, samples=k, estimator=estimator))
                se = got["stderr"]
                means.append(float(se.mean()))
                rows.append([job, estimator, sigma, k, float(se.max()), float(se.mean()),
                             float(np.median(se))])
            slope = float(np.polyfit(np.log(ks), np.log(means), 1)[0])
            slopes.append((job, estimator, slope))
    report.table("(1) standard error against K (one process)",
                 ["job", "estimator", "sigma", "K", "max stderr", "mean stderr", "median stderr"],
                 rows)
    report.table("(1) log-log slope of mean stderr against K (Monte Carlo: -0.5)",
                 ["job", "estimator", "slope"], [list(s) for s in slopes])
    worst = max(abs(s + 0.5) for *_, s in slopes)
    report.facts["slopes"] = {f"{j}/{e}": s for j, e, s in slopes}
    report.target(Target("max |slope + 0.5| of mean stderr against K", worst, 0.1,
                          higher_is_better=False, unit=""))


def wall_vs_k(report: Report, ks: list[int]) -> None:
    import ray

    from pipeline import RunOptions
    from pipeline.runner import run

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # untimed: the first run starts the worker processes (torch imports)
            run(RunOptions(job="contact", out=f"{tmp}/warm", shards=2, progress=False,
                           smooth=0.01, samples=4), echo=lambda s: None)
            for job, (params, sigma) in JOBS.items():
                ps = [f"{k}={v}" for k, v in params.items()]
                for k in [None, *ks]:
                    t0 = time.perf_counter()
                    summary = run(RunOptions(
                        job=job, params=ps, out=f"{tmp}/{job}-{k}", shards=2, progress=False,
                        smooth=None if k is None else sigma, samples=k or 64,
                    ), echo=lambda s: None)
                    rows.append([job, "plain" if k is None else k,
                                 round(time.perf_counter() - t0, 3),
                                 summary.manifest.compute_seconds])
    finally:
        ray.shutdown()
    report.table("(2) jacpipe run --smooth on Ray (2 CPUs, 2 shards): wall time against K",
                 ["job", "K", "run seconds", "compute seconds"], rows)


def sigma_to_zero(report: Report, sigmas: list[float]) -> None:
    from pipeline.core.smoothing import parse_smooth
    from pipeline.maths import jacobian_reference

    problem = _problem("mlp", SMOOTH_MLP)
    exact = jacobian_reference(problem)
    rows, last = [], math.inf
    for sigma in sigmas:
        row = [sigma]
        for estimator in ("first", "zeroth"):
            got = smoothed(problem, parse_smooth(sigma, samples=64, estimator=estimator))
            err = float(np.abs(got["values"] - exact).max())
            row += [err, float(got["stderr"].max())]
            if estimator == "first":
                last = err
        rows.append(row)
    report.table("(3) sigma -> 0 on mlp (tanh, float64, K = 64): max |J_s - J| against plain AD",
                 ["sigma", "first: max err", "first: max stderr", "zeroth: max err",
                  "zeroth: max stderr"], rows)
    report.target(Target(f"first-order max |J_s - J| at sigma {sigmas[-1]:g}", last, 1e-6,
                         higher_is_better=False, unit=""))


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    report = Report("smoothing", quick=args.quick)
    ks = [16, 64, 256] if args.quick else [16, 64, 256, 1024]
    stderr_vs_k(report, ks)
    wall_vs_k(report, [16, 64] if args.quick else [16, 64, 256])
    sigma_to_zero(report, [1.0, 0.1, 0.01] if args.quick else [1.0, 0.1, 0.01, 1e-3, 1e-4])
    report.finish(args.json)


if __name__ == "__main__":
    main()
