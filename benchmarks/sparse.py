"""Sparse Jacobians and Hessians by colouring: jacpipe against the dense path and SciPy.

(1) ``heat`` at n = N² (N = 1000: n = 1,000,000), 5-point pattern, float64:
    jacpipe's colouring (``choose_coloring``) and compressed evaluation (the
    engine call a shard makes, ``sparse_jacobian_rows`` over rows [0, n) in
    one call; also as 4 row shards, summed) against the dense reverse path
    (``engine.jacobian_rows`` timed on a sample of rows and *extrapolated* to
    n rows) and SciPy's sparse finite differences
    (``scipy.optimize._numdiff.approx_derivative`` with
    ``sparsity=(pattern, group_columns(pattern))``) on a NumPy implementation
    of the same residual, 2-point and 3-point, with SciPy's error against
    jacpipe's (exact AD) values.
(2) The n-dimensional Rosenbrock Hessian (tridiagonal, n = 1,000,000):
    ``sparse_hessian_rows`` with a symmetric colouring (3 HVPs) against the
    dense Hessian path (``engine.hessian_rows`` on sampled rows, extrapolated).
(3) End to end (skipped with ``--quick`` or ``--no-e2e``): ``pipeline.run`` of
    ``heat`` on a local Ray (``ray.init(num_cpus=2)``, warmed first) writing
    the sparse Parquet result.

Methods are timed interleaved (harness), medians of ``--repeats`` (>= 3).
jacpipe runs with ``--threads`` torch threads (default 1: what a shard with
``--cpus-per-shard 1`` uses, and the one core NumPy/SciPy use). Writes
``benchmarks/results/sparse.json`` and, for a full run, ``benchmarks/sparse.md``.

    python -m benchmarks.sparse            # N = 1000, n = 1,000,000; ~5 minutes
    python -m benchmarks.sparse --quick    # N = 200, n = 40,000; < 1 minute
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import Report, Target, interleaved, median, parser, seconds

HERE = Path(__file__).resolve().parent
MARKDOWN = HERE / "sparse.md"
DENSE_VS_SPARSE = 1000.0  # targets (1) and (2): at least this many times the dense path
VS_SCIPY = 1.0  # target (1): jacpipe time / SciPy time at most this
AD_PRECISION = 1e-12  # jacpipe vs dense AD rows: max |diff| / max |J|
HEAT = {"dt": 1e-4, "alpha": 1.0, "beta": 0.5}  # jobs.heat defaults, also used by the NumPy twin
SHARDS = 4  # the "as row shards" variant


# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------


def numpy_heat(problem: Any, N: int) -> Callable[[Any], Any]:
    """The ``heat`` residual in NumPy (flat in, flat out), for SciPy's finite differences.

    ``u_prev`` is read back from the job's own closure: ``R(0) = -u_prev``
    exactly (the Laplacian of zero is zero).
    """
    import numpy as np
    import torch

    u_prev = -problem.fn(torch.zeros_like(problem.x)).detach().numpy()
    h = 1.0 / (N + 1)
    dt, alpha, beta = HEAT["dt"], HEAT["alpha"], HEAT["beta"]

    def laplacian(u: Any) -> Any:
        p = np.pad(u, 1)
        return (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u) / h**2

    def fn(v: Any) -> Any:
        v = v.reshape(N, N)
        # v * v * v, not v**3: NumPy's float power is 30x slower, and the
        # baseline should be a fast one.
        return (v - u_prev - dt * alpha * laplacian(v + beta * v * v * v / 3)).reshape(-1)

    return fn


def rosenbrock_problem(n: int) -> tuple[Any, str]:
    """The Rosenbrock Hessian problem with its tridiagonal pattern, and where it came from."""
    try:
        from jobs.rosenbrock import build

        problem = build(n=n, pattern=True)
        if problem.sparsity is not None and problem.kind == "hessian":
            return problem, "jobs.rosenbrock"
    except (ImportError, TypeError):
        pass
    import torch

    from pipeline.problem import Problem
    from pipeline.sparse import banded_pattern

    def rosenbrock(x: torch.Tensor) -> torch.Tensor:
        head, tail = x[:-1], x[1:]
        return (100.0 * (tail - head**2) ** 2 + (1.0 - head) ** 2).sum()

    x = 1.0 + 0.5 * torch.randn(n, generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)
    return Problem(fn=rosenbrock, x=x, kind="hessian", sparsity=banded_pattern(n, 3)), "local"


# ---------------------------------------------------------------------------
# Shared measurements
# ---------------------------------------------------------------------------


def worker_chunk(problem: Any, rows: int) -> int:
    """The dense chunk a worker would plan (default budget, 2 slots), capped at ``rows``."""
    import psutil

    from pipeline.runner import plan
    from pipeline.runner.worker import activation_numel

    n = problem.x.numel()
    budget = plan.default_memory_budget(psutil.virtual_memory().total, 2)
    chunk = plan.chunk_rows(
        budget=budget, baseline=psutil.Process().memory_info().rss, m=n, n=n,
        activations=activation_numel(problem), itemsize=problem.x.element_size(),
        group_bytes=2 * plan.group_rows(n, 8) * n * 8, method="rev",
    )
    return max(1, min(chunk, rows))


def sample_error(dense: Any, csr: Any, start: int) -> tuple[float, float]:
    """``(max |dense - csr| on the pattern, max |dense| off it)`` over dense rows from ``start``.

    Scaled by ``max |csr|``; both 0 when jacpipe's rows equal the dense AD rows.
    """
    import numpy as np

    d = np.array(dense.detach().numpy())  # a writable copy
    block = csr[start : start + d.shape[0]]
    local = np.repeat(np.arange(d.shape[0]), np.diff(block.indptr))
    scale = float(abs(csr).max()) or 1.0
    on = float(np.abs(d[local, block.indices] - block.data).max()) / scale
    d[local, block.indices] = 0
    return on, float(np.abs(d).max()) / scale


def duration(t: float) -> str:
    """Seconds for the tables, with hours for the extrapolated dense times."""
    return seconds(t) if t < 3600 else f"{t:,.0f} s ({t / 3600:.1f} h)"


def ratio(r: float) -> str:
    return f"{r:,.0f}x" if r >= 100 else f"{r:.2f}x"


def to_csr(rows: Any, shape: tuple[int, int]) -> Any:
    import scipy.sparse as sp

    return sp.csr_matrix((rows.values.detach().numpy(), rows.cols, rows.indptr), shape=shape)


def cold_start() -> float:
    """Seconds of the first compressed call in a fresh process, minus a warm one (tiny heat).

    The first JVP through torch's Python decompositions imports ``torch._dynamo``;
    every Ray worker pays this once.
    """
    from jobs.heat import build
    from pipeline.sparse import choose_coloring, sparse_jacobian_rows

    problem = build(N=8)
    coloring = choose_coloring(problem.sparsity)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        sparse_jacobian_rows(problem.fn, problem.x, 0, 64, problem.sparsity, coloring)
        times.append(time.perf_counter() - t0)
    return times[0] - times[1]


# ---------------------------------------------------------------------------
# (1) heat
# ---------------------------------------------------------------------------


def bench_heat(report: Report, N: int, repeats: int, sample_rows: int) -> Any:
    """Section (1); returns jacpipe's Jacobian (CSR) for the end-to-end check."""
    from scipy.optimize._numdiff import approx_derivative, group_columns

    from jobs.heat import build
    from pipeline.maths import engine
    from pipeline.sparse import choose_coloring, sparse_jacobian_rows

    problem = build(N=N, **HEAT)
    fn, x, pattern = problem.fn, problem.x, problem.sparsity
    n = x.numel()
    f_np = numpy_heat(problem, N)
    x_np = x.detach().numpy().reshape(-1)
    twin = float(abs(f_np(x_np) - fn(x).detach().numpy().reshape(-1)).max())
    print(f"heat N={N}: n = {n:,}, nnz = {pattern.nnz:,}; NumPy twin residual "
          f"max |diff| = {twin:.1e}; {repeats} rounds ...", flush=True)

    held: dict[str, Any] = {}
    color_times = interleaved(
        {"jacpipe choose_coloring": lambda: choose_coloring(pattern),
         "SciPy group_columns": lambda: group_columns(pattern)},
        repeats=repeats, warmup=0, after=held.__setitem__,
    )
    coloring, groups = held["jacpipe choose_coloring"], held["SciPy group_columns"]
    num_groups = int(groups.max()) + 1

    a = n // 2 - sample_rows // 2  # sampled rows: the middle of the grid
    chunk = worker_chunk(problem, sample_rows)
    shard_bounds = [(n * k // SHARDS, n * (k + 1) // SHARDS) for k in range(SHARDS)]
    names = {
        "jacpipe": "jacpipe compressed, rows [0, n) in one call",
        "shards": f"jacpipe compressed, as {SHARDS} row shards (summed)",
        "dense": f"dense reverse (engine.jacobian_rows), {sample_rows} rows x n/{sample_rows}",
        "fd2": "SciPy approx_derivative 2-point",
        "fd3": "SciPy approx_derivative 3-point",
    }
    methods = {
        names["jacpipe"]: lambda: sparse_jacobian_rows(fn, x, 0, n, pattern, coloring),
        names["shards"]: lambda: [sparse_jacobian_rows(fn, x, s, e, pattern, coloring)
                                  for s, e in shard_bounds],
        names["dense"]: lambda: engine.jacobian_rows(fn, x, a, a + sample_rows,
                                                     chunk_size=chunk),
        names["fd2"]: lambda: approx_derivative(f_np, x_np, method="2-point",
                                                sparsity=(pattern, groups)),
        names["fd3"]: lambda: approx_derivative(f_np, x_np, method="3-point",
                                                sparsity=(pattern, groups)),
    }
    times = interleaved(methods, repeats=repeats, warmup=1, after=held.__setitem__)
    ours = to_csr(held[names["jacpipe"]], (n, n))
    on, off = sample_error(held[names["dense"]], ours, a)
    scale = float(abs(ours).max())
    fd_err = {k: float(abs(held[names[k]] - ours).max()) for k in ("fd2", "fd3")}
    del held

    t = {k: median(times[v]) for k, v in names.items()}
    t["dense"] *= n / sample_rows  # extrapolated to all n rows
    t_color = median(color_times["jacpipe choose_coloring"])
    t_group = median(color_times["SciPy group_columns"])
    rows = [
        ["jacpipe choose_coloring", f"{coloring.num_colors} colours ({coloring.mode})",
         seconds(t_color), "", ""],
        ["SciPy group_columns", f"{num_groups} groups", seconds(t_group), "", ""],
    ]
    passes = {"jacpipe": f"{coloring.num_colors} JVPs",
              "shards": f"{SHARDS} x {coloring.num_colors} JVPs",
              "dense": f"{n:,} VJPs", "fd2": f"{num_groups + 1} evaluations",
              "fd3": f"{2 * num_groups + 1} evaluations"}
    errors = {"jacpipe": f"{on:.1e} vs dense AD", "dense": "(reference)",
              "fd2": f"{fd_err['fd2'] / scale:.1e}", "fd3": f"{fd_err['fd3'] / scale:.1e}"}
    for k, label in names.items():
        extrapolated = " (extrapolated)" if k == "dense" else ""
        rows.append([label, passes[k], duration(t[k]) + extrapolated,
                     ratio(t[k] / t["jacpipe"]), errors.get(k, "")])
    rows.append(["colour + evaluate: jacpipe", "", seconds(t_color + t["jacpipe"]), "", ""])
    rows.append(["group + evaluate: SciPy 2-point", "", seconds(t_group + t["fd2"]),
                 ratio((t_group + t["fd2"]) / (t_color + t["jacpipe"])), ""])
    report.table(
        f"(1) heat Jacobian, n = {n:,} (N = {N}), float64, median of {repeats}",
        ["method", "passes", "time", "time / jacpipe", "max error / max |J|"], rows,
    )
    report.target(Target("heat: dense reverse path (extrapolated) / jacpipe", t["dense"]
                         / t["jacpipe"], DENSE_VS_SPARSE,
                         note=f"dense timed on {sample_rows} rows, chunk {chunk}"))
    report.target(Target("heat: jacpipe / SciPy 2-point time", t["jacpipe"] / t["fd2"],
                         VS_SCIPY, higher_is_better=False,
                         note=f"evaluation only; SciPy error {fd_err['fd2'] / scale:.1e}"))
    report.target(Target("heat: jacpipe vs dense AD rows, max |diff| / max |J|", on,
                         AD_PRECISION, higher_is_better=False, unit="",
                         note=f"entries off the pattern: {off:.1e}"))
    report.facts["heat"] = {
        "N": N, "n": n, "nnz": int(pattern.nnz), "colors": coloring.num_colors,
        "mode": coloring.mode, "scipy_groups": num_groups, "sample_rows": sample_rows,
        "dense_chunk": chunk, "numpy_twin_max_diff": twin, "max_abs_J": scale,
        "scipy_max_abs_error": fd_err, "ad_vs_dense_rel": on, "off_pattern_rel": off,
        "median_s": t, "coloring_s": color_times, "times_s": times,
    }
    return ours


# ---------------------------------------------------------------------------
# (2) Rosenbrock Hessian
# ---------------------------------------------------------------------------


def bench_rosenbrock(report: Report, n: int, repeats: int, sample_rows: int) -> None:
    from pipeline.maths import engine
    from pipeline.sparse import choose_coloring, sparse_hessian_rows

    problem, source = rosenbrock_problem(n)
    fn, x, pattern = problem.fn, problem.x, problem.sparsity
    print(f"rosenbrock n={n:,} ({source}); {repeats} rounds ...", flush=True)
    t0 = time.perf_counter()
    coloring = choose_coloring(pattern, symmetric=True)
    t_color = time.perf_counter() - t0
    a = n // 2 - sample_rows // 2
    chunk = worker_chunk(problem, sample_rows)
    names = {"jacpipe": "jacpipe sparse_hessian_rows, rows [0, n) in one call",
             "dense": f"dense Hessian (engine.hessian_rows), {sample_rows} rows x "
                      f"n/{sample_rows}"}
    held: dict[str, Any] = {}
    times = interleaved(
        {names["jacpipe"]: lambda: sparse_hessian_rows(fn, x, 0, n, pattern, coloring),
         names["dense"]: lambda: engine.hessian_rows(fn, x, a, a + sample_rows,
                                                     chunk_size=chunk)},
        repeats=repeats, warmup=1, after=held.__setitem__,
    )
    ours = to_csr(held[names["jacpipe"]], (n, n))
    on, off = sample_error(held[names["dense"]], ours, a)
    del held
    t = {k: median(times[v]) for k, v in names.items()}
    t["dense"] *= n / sample_rows
    report.table(
        f"(2) Rosenbrock Hessian, n = {n:,}, float64, median of {repeats}",
        ["method", "passes", "time", "time / jacpipe", "max error / max |H|"],
        [["jacpipe choose_coloring (symmetric)", f"{coloring.num_colors} colours",
          seconds(t_color), "", ""],
         [names["jacpipe"], f"{coloring.num_colors} HVPs", seconds(t["jacpipe"]), "1.00x",
          f"{on:.1e} vs dense AD"],
         [names["dense"], f"{n:,} rows", duration(t["dense"]) + " (extrapolated)",
          ratio(t["dense"] / t["jacpipe"]), "(reference)"]],
    )
    report.target(Target("rosenbrock: dense Hessian path (extrapolated) / jacpipe",
                         t["dense"] / t["jacpipe"], DENSE_VS_SPARSE,
                         note=f"dense timed on {sample_rows} rows, chunk {chunk}"))
    report.target(Target("rosenbrock: jacpipe vs dense AD rows, max |diff| / max |H|", on,
                         AD_PRECISION, higher_is_better=False, unit="",
                         note=f"entries off the pattern: {off:.1e}"))
    report.facts["rosenbrock"] = {
        "n": n, "source": source, "colors": coloring.num_colors, "mode": coloring.mode,
        "coloring_s": t_color, "sample_rows": sample_rows, "dense_chunk": chunk,
        "ad_vs_dense_rel": on, "off_pattern_rel": off, "median_s": t, "times_s": times,
    }


# ---------------------------------------------------------------------------
# (3) End to end
# ---------------------------------------------------------------------------


def bench_end_to_end(report: Report, N: int, repeats: int, reference: Any) -> None:
    """Section (3); ``reference`` is section (1)'s Jacobian, compared with the Parquet result."""
    import ray

    from pipeline import RunOptions, run
    from pipeline.store import read_jacobian

    root = Path(tempfile.mkdtemp(prefix="jacpipe-sparse-"))
    manifests: list[dict[str, Any]] = []

    def once() -> None:
        summary = run(RunOptions(job="heat", params=[f"N={N}"], out=str(root / "heat"),
                                 resume=False, overwrite=True, progress=False),
                      echo=lambda _: None)
        manifests.append(summary.manifest.to_json())

    print(f"end to end: jacpipe run heat N={N} on a local Ray, {repeats} rounds ...",
          flush=True)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        # Warm: workers import torch and take the JVP cold start (see cold_start).
        run(RunOptions(job="heat", params=["N=50"], out=str(root / "warm"), progress=False),
            echo=lambda _: None)
        times = interleaved({"run": once}, repeats=repeats, warmup=0)["run"]
        result = read_jacobian(str(root / "heat"))
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    last = manifests[-1]
    shards = last["shards"]
    size = sum(int(s["bytes"]) for s in shards)
    diff = float(abs(result - reference).max())
    report.table(
        f"(3) end to end: pipeline.run(heat, N={N}) on a local Ray (2 CPUs), median of "
        f"{repeats}",
        ["wall", "driver before shards", "shards (wall)", "shards", "sum of shard seconds",
         "colours", "nnz", "Parquet", "max |file - in-process|"],
        [[seconds(median(times)), seconds(last["wall_seconds"] - last["compute_seconds"]),
          seconds(float(last["compute_seconds"])), len(shards),
          f"{sum(float(s['seconds']) for s in shards):.1f} s",
          last["coloring"]["num_colors"], f"{result.nnz:,}", f"{size / 2**20:.1f} MiB",
          f"{diff:.1e}"]],
    )
    report.facts["end_to_end"] = {
        "times_s": times, "shards": len(shards), "bytes": size, "nnz": int(result.nnz),
        "wall_seconds": [m["wall_seconds"] for m in manifests],
        "compute_seconds": [m["compute_seconds"] for m in manifests],
        "shard_seconds": [s["seconds"] for s in shards], "max_diff_vs_in_process": diff,
    }


# ---------------------------------------------------------------------------


def write_markdown(report: Report, command: str) -> None:
    from benchmarks.harness import markdown_table

    parts = ["# Sparse Jacobians and Hessians by colouring (issue 8)", "",
             f"Reproduce: `{command}` (results: `benchmarks/results/sparse.json`).", "",
             f"Machine: {report.facts['machine_note']}.", ""]
    for table in report.tables:
        parts += [f"## {table['title']}", "", markdown_table(table["headers"], table["rows"]), ""]
    parts += ["## Targets", ""]
    parts += [f"- {t.line().strip()}" for t in report.targets]
    parts += ["", *report.facts["notes"], ""]
    MARKDOWN.write_text("\n".join(parts))
    print(f"wrote {MARKDOWN}")


def main(argv: list[str] | None = None) -> int:
    import os

    import torch

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=None, help="heat grid side (n = N^2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for jacpipe")
    p.add_argument("--sample-rows", type=int, default=64, help="dense rows timed")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end Ray run")
    args = p.parse_args(argv)
    N = args.N or (200 if args.quick else 1000)
    repeats = max(3, args.repeats or 3)
    torch.set_num_threads(args.threads)
    report = Report("sparse", quick=args.quick)
    cold = cold_start()
    load = os.getloadavg()
    report.facts["machine_note"] = (
        f"{os.cpu_count()} CPUs, torch {torch.__version__} with {args.threads} thread(s) "
        f"for jacpipe; a shared machine, load average {load[0]:.1f} at the start")
    report.facts["notes"] = [
        "- jacpipe rows: `sparse_jacobian_rows` / `sparse_hessian_rows`, the call a shard "
        "makes, over all rows in one call; the dense rows are timed on a sample and "
        "extrapolated linearly to n rows (each sample call includes one forward recording).",
        f"- The {SHARDS}-shard row: every row shard runs the full-size JVPs (fn is evaluated "
        "on all of x), so S shards cost about S times one call in total; sharding a sparse "
        "job buys parallel writing, not less compute.",
        "- SciPy times are evaluation only, with `sparsity=(pattern, group_columns(pattern))` "
        "precomputed, as jacpipe's colouring is; the colour/group + evaluate rows add both.",
        f"- First compressed call in a fresh process: {cold:.1f} s extra (the JVP's Python "
        "decompositions import `torch._dynamo`); every Ray worker pays it once.",
    ]
    heat = bench_heat(report, N, repeats, args.sample_rows)
    bench_rosenbrock(report, N * N, repeats, args.sample_rows)
    if not (args.quick or args.no_e2e):
        bench_end_to_end(report, N, repeats, heat)
    del heat
    report.facts.update(cold_start_s=cold, threads=args.threads, loadavg_end=os.getloadavg())
    report.facts["machine_note"] += f", {report.facts['loadavg_end'][0]:.1f} at the end"
    report.finish(args.json)
    if not args.quick and args.json is None:
        write_markdown(report, "python -m benchmarks.sparse" + (f" --N {N}" if args.N else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
