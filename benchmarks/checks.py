"""The engine's own checks (forward vs reverse mode, vmap vs none): false alarms and cost.

(1) False alarms: every built-in job (small parameters, ``benchmarks.adjoint.JOBS``)
    in float32 and float64, job seeds ``0 .. SEEDS - 1``: the run's vmap spot
    check (:func:`pipeline.maths.adjoint.vmap_spot_check`, seeded the same)
    and every engine path that can run on it (dense ``rev`` and ``fwd`` rows,
    all at once and in chunks of 7; the sparse compressed rows where the job
    has a pattern), under the ``fallback`` policy with a log. A false alarm is
    a spot check that disagrees or any line in the log. Target: none.
(2) Cost per shard: the rows a shard computes (one engine call over the
    whole range, the method ``--method auto`` picks; sparse jobs: the
    compressed evaluation); the checks' own wall time (each check function
    timed where it is called) over the rest of the shard's, medians of
    ``--repeats``, 2 torch threads: as a run's shard computes them (the
    forward check only for per-sample kinds: the run's own check covered
    the others) and as a direct engine call. Target: at most 5% on every
    job in a run.
(3) Cost per run: the run's own checks (the adjoint check where forward mode
    may run, the vmap spot check) as ``check_job`` times them, against the
    wall time of the same run (``pipeline.run(..., executor="local")``;
    the ``make run`` job is ``mlp -p n=2000 -p m=2000``).

    python -m benchmarks.checks            # a few minutes on 2 loaded cores
    python -m benchmarks.checks --quick    # under a minute
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator

import torch

from benchmarks.adjoint import JOBS, build
from benchmarks.harness import Report, Target, median, parser

SEEDS = 8
#: Shard-sized problems for the cost (2): job, parameters.
COST_JOBS: dict[str, dict] = {
    "mlp": {"n": 2000, "m": 2000},  # make run's job (a shard of it: all 2000 rows here)
    "heat": {"N": 100},  # sparse (5-point stencil, column colouring: forward mode)
    "cnn": {"batch": 16, "channels": 8},
    "robot_arm": {"batch": 2000},  # per-sample, tall: forward mode
    "rosenbrock": {"n": 1000, "pattern": False},  # a dense Hessian
    "trajectory": {"waypoints": 300},
    "mlp_tall": {"n": 16, "m": 4000, "hidden": 512},  # tall: forward mode
}
QUICK_COST_JOBS: dict[str, dict] = {
    "mlp": {"n": 400, "m": 400, "hidden": 128},
    "heat": {"N": 30},
    "robot_arm": {"batch": 200},
    "mlp_tall": {"n": 16, "m": 2000, "hidden": 256},
}


def _seeded(job: str, params: dict, seed: int, dtype: str):
    import inspect

    from pipeline.problem import resolve_builder

    builder = resolve_builder(job.removesuffix("_single"))
    takes_seed = "seed" in inspect.signature(builder).parameters
    return build(job, {**params, **({"seed": seed} if takes_seed else {})}, dtype)


def _engine_paths(p, log: list[str]) -> None:
    """Every engine path on ``p``, under the fallback policy, reports into ``log``."""
    from pipeline.core.kinds import kind_of
    from pipeline.maths import checks
    from pipeline.maths.kinds import iter_rows
    from pipeline.problem.problem import validate

    shapes = validate(p)
    with checks.checking(forward="fallback", log=log):
        for method in ("rev", "fwd"):
            for chunk in (None, 7):
                for _ in iter_rows(p, 0, shapes.total_rows, chunk_size=chunk, method=method):
                    pass
        if p.sparsity is not None and kind_of(p.kind).sparse_ok:
            from pipeline.sparse.coloring import choose_coloring
            from pipeline.sparse.compressed import evaluate_rows

            coloring = choose_coloring(p.sparsity, symmetric=kind_of(p.kind).symmetric)
            evaluate_rows(p, 0, shapes.total_rows, coloring)


def false_alarms(report: Report, *, quick: bool) -> None:
    from pipeline.maths.adjoint import vmap_spot_check

    rows, alarms = [], 0
    for job, params in JOBS.items():
        for dtype in ("float32", "float64"):
            spots, lines = 0, []
            for seed in range(2 if quick else SEEDS):
                p = _seeded(job, params, seed, dtype)
                spot = vmap_spot_check(p, seed=seed)
                spots += spot is not None and not spot.agree
                _engine_paths(p, lines)
            alarms += spots + len(lines)
            rows.append([job, p.kind, dtype, spots, len(lines), lines[0] if lines else ""])
    report.table(f"(1) false alarms over job seeds 0..{(2 if quick else SEEDS) - 1}",
                 ["job", "kind", "dtype", "spot checks disagreeing", "engine reports",
                  "first report"], rows)
    report.facts["false_alarms"] = alarms
    report.target(Target("false alarms on the built-in jobs", alarms, 0,
                         higher_is_better=False, unit=""))


@contextlib.contextmanager
def timed_checks(spent: list[float]) -> Iterator[None]:
    """The engine's own checks, each call's wall time added to ``spent[0]`` (outermost only).

    The overhead is measured directly, not as the difference of two noisy
    totals: on a shared machine two runs of the same shard differ by more
    than the checks cost.
    """
    from pipeline.maths import checks, engine
    from pipeline.sparse import compressed

    depth = [0]

    def timer(f):
        def wrapped(*args, **kwargs):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[0] += time.perf_counter() - t0
        return wrapped

    places = [(checks, "forward_rejected"), (engine, "_spot_rejected"),
              (engine, "_checked_samples"), (engine, "_checked_hessian_rows"),
              (compressed, "_checked_values")]
    saved = [getattr(mod, name) for mod, name in places]
    for (mod, name), f in zip(places, saved, strict=True):
        setattr(mod, name, timer(f))
    try:
        yield
    finally:
        for (mod, name), f in zip(places, saved, strict=True):
            setattr(mod, name, f)


def _shard(p, method: str):
    """One shard's rows, as the worker computes them (all rows, one engine call)."""
    from pipeline.core.kinds import kind_of
    from pipeline.maths.kinds import iter_rows
    from pipeline.problem.problem import validate

    shapes = validate(p)
    if p.sparsity is not None and kind_of(p.kind).sparse_ok:
        from pipeline.sparse.coloring import choose_coloring
        from pipeline.sparse.compressed import evaluate_rows

        coloring = choose_coloring(p.sparsity, symmetric=kind_of(p.kind).symmetric)
        return lambda: evaluate_rows(p, 0, shapes.total_rows, coloring), coloring.mode
    return lambda: [b for _, b in iter_rows(p, 0, shapes.total_rows, method=method)], method


def _share(compute, repeats: int, *, per_sample: bool | None) -> tuple[float, float]:
    """``(checks' time / the rest's, median total)``; ``per_sample`` None: a direct call.

    Otherwise the call runs as in a shard of a run (``fallback`` policy; the
    forward check only for per-sample kinds, no vmap spot check: the run's
    own checks covered them, NOTE: [Checks on every engine call]).
    """
    from pipeline.maths import checks

    context = (contextlib.nullcontext() if per_sample is None else
               checks.checking(forward="fallback", log=[], check_forward=per_sample,
                               check_vmap=False))
    shares, totals = [], []
    with context:
        compute()  # warm up
        for _ in range(repeats):
            spent = [0.0]
            with timed_checks(spent):
                t0 = time.perf_counter()
                compute()
                total = time.perf_counter() - t0
            shares.append(spent[0] / (total - spent[0]))
            totals.append(total)
    return median(shares), median(totals)


def shard_cost(report: Report, *, quick: bool, repeats: int) -> None:
    from pipeline.core.kinds import kind_of
    from pipeline.problem.problem import validate
    from pipeline.runner.plan import choose_method

    rows, worst = [], 0.0
    for job, params in (QUICK_COST_JOBS if quick else COST_JOBS).items():
        p = build(job.removesuffix("_tall"), params, "float32")
        s = validate(p)
        method = choose_method("auto", m=s.m, n=s.n, shards=1) if not kind_of(
            s.kind).symmetric else "rev"
        compute, mode = _shard(p, method)
        share, total = _share(compute, repeats, per_sample=kind_of(s.kind).per_sample)
        direct, _ = _share(compute, repeats, per_sample=None)
        worst = max(worst, share)
        rows.append([job, s.kind, str(params), mode, f"{total * 1e3:.1f} ms",
                     f"{100 * share:.2f}%", f"{100 * direct:.2f}%"])
    report.table("(2) cost per shard: the checks' time over the rest of the shard's "
                 "(float32, 2 threads; medians); in a run, and as a direct engine call",
                 ["job", "kind", "params", "path", "shard", "checks / rest (run)",
                  "checks / rest (direct call)"], rows)
    report.facts["shard_overhead_max"] = worst
    report.target(Target("engine checks' overhead on a run's shard, worst job", 100 * worst,
                         5.0, higher_is_better=False, unit="%"))


def run_cost(report: Report, *, quick: bool) -> None:
    import json

    import pyarrow.parquet as pq

    import pipeline

    runs = {"mlp": ["n=400", "m=400", "hidden=128"]} if quick else {
        "mlp": ["n=2000", "m=2000"], "robot_arm": ["batch=2000"], "heat": ["N=100"],
        "cnn": ["batch=16", "channels=8"]}
    rows, worst = [], 0.0
    for job, params in runs.items():
        for attempt in range(2):  # the first pays the process's one-time set-up
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                pipeline.run(job, params=params, out=out, executor="local", progress=False,
                             echo=lambda _: None)
                wall = time.perf_counter() - t0
                doc = json.loads(pq.read_schema(f"{out}/_manifest.parquet")
                                 .metadata[b"jacpipe.manifest"])
            adjoint, spot = doc.get("adjoint_check"), doc.get("vmap_check")
            seconds = sum(float(c["seconds"]) for c in (adjoint, spot) if c)
            if attempt:
                worst = max(worst, seconds / wall)
            rows.append([job, " ".join(params), "first" if attempt == 0 else "second",
                         f"{float(adjoint['seconds']) * 1e3:.1f} ms" if adjoint else "-",
                         f"{float(spot['seconds']) * 1e3:.1f} ms" if spot else "-",
                         f"{wall:.2f} s", f"{100 * seconds / wall:.2f}%"])
    report.table("(3) the run's own checks against the run's wall time (executor local; the "
                 "first run of a process pays torch.func's set-up)",
                 ["job", "params", "run", "adjoint check", "vmap spot check", "run wall",
                  "share"], rows)
    report.facts["run_share_max"] = worst
    report.target(Target("run-level checks' share of a run (second run), worst job",
                         100 * worst, 5.0, higher_is_better=False, unit="%"))


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(2)
    report = Report("checks", quick=args.quick)
    false_alarms(report, quick=args.quick)
    shard_cost(report, quick=args.quick, repeats=max(args.repeats or (3 if args.quick else 7), 3))
    run_cost(report, quick=args.quick)
    report.finish(args.json)


if __name__ == "__main__":
    main()
