"""Higher-order kinds at scale: per-point Laplacians of a big MLP and third-derivative tensors.

(1) ``jacpipe run poisson`` (the 50 -> 768 -> 768 -> 512 -> 512 -> 1 tanh MLP,
    float64) end to end under ``--memory-budget 1GiB``, in process and on an
    embedded Ray (2 CPUs, 2 shards), against the in-process operator over the
    same points (``laplacian(fn, batched=True)`` in chunks, no files).
    Reported: seconds, the ratio, and the peak RSS of every process (driver
    and shard tasks). Target (at 10^6 points): <= 1.2x and <= 1.2 GiB.
(2) ``compare`` of that result on sampled points: MATCH, max relative error
    against nested ``torch.func`` (target <= 1e-10, float64).
(3) The third-derivative tensor of a Lennard-Jones cluster at n = 30 against
    ``jacrev(jacrev(jacrev(f)))`` (target: relative 1e-10).
(4) The third-derivative tensor at a larger n end to end (in process, float32,
    ``--memory-budget 1GiB``) against the same rows computed in process by
    ``iter_third_rows`` (n(n+1)/2 reverse passes over second-order jets, no
    files). Target (at n = 1,000): <= 1.3x.
(5) The README's sparse third-derivative example, ``jacpipe run lennard_jones
    -p atoms=64 -p cutoff=1.6 -p pattern=known`` (``--executor local``),
    against the same run without the pattern: the rows computed, the seconds
    (median of interleaved rounds) and the speed-up. No target.

    python -m benchmarks.operators            # about 5 minutes on 2 cores
    python -m benchmarks.operators --quick    # about a minute
    python -m benchmarks.operators --points 1000000 --atoms 333   # the issue's sizes
    python -m benchmarks.operators --only-sparse   # (5) alone: results/operators-sparse.json
"""

from __future__ import annotations

import resource
import tempfile
import time

import numpy as np
import torch

from benchmarks.harness import Report, Target, parser

BIG = "768,768,512,512"


def _run(job: str, params: dict, out: str, **options) -> tuple[float, object]:
    from pipeline import RunOptions, run

    t0 = time.perf_counter()
    summary = run(RunOptions(job=job, params=[f"{k}={v}" for k, v in params.items()], out=out,
                             progress=False, **options), echo=lambda s: None)
    return time.perf_counter() - t0, summary


def _in_process_laplacian(params: dict, chunk: int) -> float:
    from pipeline.maths.taylor import laplacian
    from pipeline.problem import build_problem

    problem = build_problem("poisson", params)
    op = laplacian(problem.fn, batched=True, return_value=True)
    t0 = time.perf_counter()
    for a in range(0, problem.x.shape[0], chunk):
        op(problem.x[a:a + chunk])
    return time.perf_counter() - t0


def poisson(report: Report, points: int, dim: int, sample: int) -> None:
    import ray

    from pipeline.analysis.compare import compare

    params = {"points": points, "dim": dim, "hidden": BIG}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        local, summary = _run("poisson", params, f"{tmp}/local", executor="local",
                              memory_budget="1GiB", shards=2)
        chunk = summary.manifest.committed[0].chunk_size
        base = _in_process_laplacian(params, chunk)
        peak_local = max(s.peak_rss for s in summary.manifest.committed)
        rows.append(["in process (laplacian, batched)", points, round(base, 2), 1.0, "-"])
        rows.append(["jacpipe run --executor local", points, round(local, 2),
                     round(local / base, 3), round(peak_local / 2**30, 3)])
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        try:
            _run("poisson", {**params, "points": 64}, f"{tmp}/warm", executor="ray", shards=2)
            on_ray, summary_ray = _run("poisson", params, f"{tmp}/ray", executor="ray",
                                       memory_budget="1GiB", shards=2)
        finally:
            ray.shutdown()
        peak_ray = max(s.peak_rss for s in summary_ray.manifest.committed)
        rows.append(["jacpipe run on Ray (2 tasks, workers warm)", points, round(on_ray, 2),
                     round(on_ray / base, 3), round(peak_ray / 2**30, 3)])
        driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        cmp = compare(f"{tmp}/local", rows=sample, job="poisson")
        cmp_s = time.perf_counter() - t0
    report.table(f"(1) poisson: Laplacian of the {dim} -> {BIG.replace(',', ' -> ')} -> 1 "
                 "MLP over points, float64, --memory-budget 1GiB",
                 ["how", "points", "seconds", "ratio", "task peak RSS GiB"], rows)
    report.table("(2) compare on sampled points (nested torch.func)",
                 ["points checked", "status", "max rel error", "seconds"],
                 [[cmp.rows_checked, "MATCH" if cmp.ok else "MISMATCH",
                   f"{cmp.max_rel_error:.2e}", round(cmp_s, 1)]])
    report.facts["poisson"] = {"points": points, "dim": dim, "chunk": chunk,
                               "driver_peak_rss_gib": round(driver / 2**30, 3)}
    report.target(Target("poisson end to end (in process) vs the operator alone",
                         local / base, 1.2, higher_is_better=False))
    report.target(Target("poisson end to end on Ray vs the operator alone",
                         on_ray / base, 1.2, higher_is_better=False,
                         note="2 tasks on 2 cores, warm workers"))
    report.target(Target("peak RSS of a shard task under --memory-budget 1GiB",
                         max(peak_local, peak_ray) / 2**30, 1.2, higher_is_better=False,
                         unit=" GiB"))
    report.target(Target("compare max relative error (sampled points)", cmp.max_rel_error,
                         1e-10, higher_is_better=False, unit=""))


def third_small(report: Report) -> None:
    from pipeline.maths.operators import iter_third_rows, third_reference
    from pipeline.problem import build_problem

    problem = build_problem("lennard_jones", {"atoms": 10})
    n = problem.x.numel()
    t0 = time.perf_counter()
    rows = np.concatenate([b.numpy() for _, b in
                           iter_third_rows(problem.fn, problem.x, 0, n * (n + 1) // 2)])
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = third_reference(problem)
    theirs = time.perf_counter() - t0
    err = float(np.abs(rows - ref).max() / np.abs(ref).max())
    report.table("(3) third derivatives of Lennard-Jones (10 atoms, n = 30), float64",
                 ["method", "seconds", "max rel difference"],
                 [["iter_third_rows (jets + one reverse pass per row)", round(ours, 3), "-"],
                  ["jacrev(jacrev(jacrev(f)))", round(theirs, 3), f"{err:.2e}"]])
    report.target(Target("third tensor at n = 30 vs jacrev^3 (relative)", err, 1e-10,
                         higher_is_better=False, unit=""))


def third_large(report: Report, atoms: int) -> None:
    from pipeline.maths.operators import iter_third_rows
    from pipeline.problem import build_problem

    params = {"atoms": atoms, "dtype": "float32"}
    with tempfile.TemporaryDirectory() as tmp:
        run_s, summary = _run("lennard_jones", params, f"{tmp}/lj", executor="local",
                              memory_budget="1GiB", shards=2)
        chunk = summary.manifest.committed[0].chunk_size
        peak = max(s.peak_rss for s in summary.manifest.committed)
    problem = build_problem("lennard_jones", params)
    n = problem.x.numel()
    total = n * (n + 1) // 2
    t0 = time.perf_counter()
    for _ in iter_third_rows(problem.fn, problem.x, 0, total, chunk_size=chunk):
        pass
    alone = time.perf_counter() - t0
    report.table(f"(4) third derivatives end to end: {atoms} atoms, n = {n}, {total:,} rows, "
                 "float32, --memory-budget 1GiB",
                 ["how", "seconds", "ratio", "peak RSS GiB"],
                 [["rows in process (iter_third_rows, no files)", round(alone, 2), 1.0, "-"],
                  ["jacpipe run --executor local (2 shards, Parquet)", round(run_s, 2),
                   round(run_s / alone, 3), round(peak / 2**30, 3)]])
    report.facts["third"] = {"atoms": atoms, "n": n, "rows": total, "chunk": chunk}
    report.target(Target(f"third tensor end to end vs its rows in process (n = {n})",
                         run_s / alone, 1.3, higher_is_better=False))


def third_sparse(report: Report, repeats: int, atoms: int, cutoff: float = 1.6) -> None:
    from benchmarks.harness import interleaved, median, paired_speed
    from pipeline.problem import build_problem

    problem = build_problem("lennard_jones", {"atoms": atoms, "cutoff": cutoff,
                                              "pattern": "known"})
    n = problem.x.numel()
    upper = problem.sparsity.tocoo()
    computed = int((upper.row <= upper.col).sum())  # rows (j, k), j <= k, inside the pattern
    total = n * (n + 1) // 2
    with tempfile.TemporaryDirectory() as tmp:
        def one(pattern: str) -> object:
            return _run("lennard_jones", {"atoms": atoms, "cutoff": cutoff, "pattern": pattern},
                        f"{tmp}/{pattern}", executor="local", resume=False)

        times = interleaved({"none": lambda: one("none"), "known": lambda: one("known")},
                            repeats=repeats)
    speed = paired_speed(times, "none", "known")
    report.table(f"(5) sparse third derivatives: lennard_jones -p atoms={atoms} -p "
                 f"cutoff={cutoff} (n = {n}), --executor local, median of {repeats}",
                 ["pattern", "rows computed", "seconds", "speed-up"],
                 [["none", f"{total:,}", round(median(times["none"]), 2), 1.0],
                  ["known", f"{computed:,} ({computed / total:.0%})",
                   round(median(times["known"]), 2), round(speed, 2)]])
    report.facts["third_sparse"] = {"rows": total, "computed": computed, "speed_up": speed}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=None, help="poisson points")
    p.add_argument("--atoms", type=int, default=None, help="Lennard-Jones atoms (n = 3 atoms)")
    p.add_argument("--only-sparse", action="store_true", help="table (5) alone")
    args = p.parse_args()
    torch.set_num_threads(2)
    sparse_atoms, sparse_repeats = (27, 3) if args.quick else (64, args.repeats or 3)
    if args.only_sparse:
        report = Report("operators-sparse", quick=args.quick)
        third_sparse(report, repeats=sparse_repeats, atoms=sparse_atoms)
        report.finish(args.json)
        return
    report = Report("operators", quick=args.quick)
    points = args.points or (500 if args.quick else 6000)
    poisson(report, points, 50, sample=16 if args.quick else 64)
    third_small(report)
    third_large(report, args.atoms or (12 if args.quick else 40))
    third_sparse(report, repeats=sparse_repeats, atoms=sparse_atoms)
    report.finish(args.json)


if __name__ == "__main__":
    main()
