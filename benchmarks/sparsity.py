"""Automatic sparsity detection and the numba colourings, side by side with SciPy.

(1) Detection (``trace_sparsity``) of the ``heat`` residual at N = 1000
    (n = 1,000,000), in units of its own forward evaluation ``fn(x)``.
(2) End to end at n = N² in one process: jacpipe detect + colour
    (``choose_coloring``) + compressed evaluation (``sparse_jacobian_rows``)
    against SciPy ``approx_derivative`` (2-point) with ``group_columns`` on
    the same residual in NumPy (SciPy is *given* the hand pattern: it has no
    detection), with both errors against the exact Jacobian (assembled
    analytically: ``I - dt alpha L diag(1 + beta u^2)``).
(3) Colouring alone on the 1e6 5-point stencil: ``column_coloring`` (numba
    DSATUR) against SciPy's ``group_columns``, with the colour counts.
(4) Giving up on a dense problem: ``trace_sparsity`` of ``jobs.mlp`` at
    n = m = 20,000, in units of its forward evaluation.

Methods are timed interleaved (harness), medians of ``--repeats`` (>= 3),
with ``--threads`` torch threads (default 1, as NumPy/SciPy use one core).
Writes ``benchmarks/results/sparsity.json`` and, for a full run,
``benchmarks/sparsity.md``.

    python -m benchmarks.sparsity            # N = 1000, mlp 20,000; a few minutes
    python -m benchmarks.sparsity --quick    # N = 200, mlp 4,000; < 1 minute
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import Report, Target, interleaved, median, parser, seconds
from benchmarks.sparse import HEAT, numpy_heat

HERE = Path(__file__).resolve().parent
MARKDOWN = HERE / "sparsity.md"
DETECT_VS_FORWARD = 30.0  # (1): detection at most this many forward evaluations
VS_SCIPY = 1.0  # (2), (3): jacpipe time / SciPy time at most this
GIVE_UP_VS_FORWARD = 3.0  # (4)


def exact_heat_jacobian(problem: Any, N: int) -> Any:
    """The heat residual's Jacobian, assembled analytically (CSR, float64)."""
    import numpy as np
    import scipy.sparse as sp

    u = problem.x.detach().double().numpy().reshape(-1)
    h = 1.0 / (N + 1)
    t = sp.diags([np.ones(N - 1), -2 * np.ones(N), np.ones(N - 1)], [-1, 0, 1])
    eye = sp.identity(N)
    lap = (sp.kron(eye, t) + sp.kron(t, eye)) / h**2
    g = sp.diags(1 + HEAT["beta"] * u * u)
    return (sp.identity(N * N) - HEAT["dt"] * HEAT["alpha"] * (lap @ g)).tocsr()


def max_error(a: Any, b: Any) -> float:
    return float(abs(a - b).max())


def bench_detection(report: Report, N: int, repeats: int) -> Any:
    """Section (1); returns the problem and its detected pattern."""
    from jobs.heat import build
    from pipeline.sparse import trace_sparsity

    problem = build(N=N, **HEAT)
    held: dict[str, Any] = {}
    times = interleaved(
        {"detect": lambda: trace_sparsity(problem.fn, problem.x),
         "forward": lambda: problem.fn(problem.x)},
        repeats=repeats, after=held.__setitem__,
    )
    found = held["detect"]
    t_detect, t_forward = median(times["detect"]), median(times["forward"])
    same = (found.pattern != problem.sparsity).nnz == 0
    report.table(
        f"(1) detection of the heat residual's pattern, n = {N * N:,}, median of {repeats}",
        ["step", "time", "in forward evaluations", "result"],
        [["fn(x) (forward)", seconds(t_forward), "1", ""],
         ["trace_sparsity (global)", seconds(t_detect), f"{t_detect / t_forward:.1f}",
          f"{found.pattern.nnz:,} nonzeros, equal to the hand pattern: {same}"]],
    )
    report.target(Target("heat detection / forward evaluation", t_detect / t_forward,
                         DETECT_VS_FORWARD, higher_is_better=False,
                         note=f"pattern equals the hand 5-point pattern: {same}"))
    report.facts["detection"] = {"N": N, "times_s": times, "nnz": int(found.pattern.nnz),
                                 "equals_hand_pattern": same}
    return problem, found.pattern


def bench_end_to_end(report: Report, problem: Any, N: int, repeats: int) -> None:
    """Section (2)."""
    import scipy.sparse as sp
    from scipy.optimize._numdiff import approx_derivative, group_columns

    from benchmarks.sparse import to_csr
    from pipeline.sparse import choose_coloring, sparse_jacobian_rows, trace_sparsity

    n = N * N
    fn, x, hand = problem.fn, problem.x, problem.sparsity
    f_np = numpy_heat(problem, N)
    x_np = x.detach().numpy().reshape(-1)
    exact = exact_heat_jacobian(problem, N)
    parts: dict[str, list[float]] = {"detect": [], "colour": [], "evaluate": [],
                                     "group": [], "fd": []}

    def ours() -> Any:
        import time

        t0 = time.perf_counter()
        pattern = trace_sparsity(fn, x).pattern
        t1 = time.perf_counter()
        coloring = choose_coloring(pattern)
        t2 = time.perf_counter()
        rows = sparse_jacobian_rows(fn, x, 0, n, pattern, coloring)
        t3 = time.perf_counter()
        parts["detect"].append(t1 - t0)
        parts["colour"].append(t2 - t1)
        parts["evaluate"].append(t3 - t2)
        return rows, coloring

    def scipy_fd() -> Any:
        import time

        t0 = time.perf_counter()
        groups = group_columns(hand)
        t1 = time.perf_counter()
        jac = approx_derivative(f_np, x_np, method="2-point", sparsity=(hand, groups))
        t2 = time.perf_counter()
        parts["group"].append(t1 - t0)
        parts["fd"].append(t2 - t1)
        return jac, int(groups.max()) + 1

    held: dict[str, Any] = {}
    times = interleaved({"jacpipe": ours, "scipy": scipy_fd}, repeats=repeats, warmup=1,
                        after=held.__setitem__)
    for k in parts:  # drop the warm-up round
        parts[k] = parts[k][1:]
    (rows, coloring), (fd, groups) = held["jacpipe"], held["scipy"]
    ours_err = max_error(to_csr(rows, (n, n)), exact)
    fd_err = max_error(sp.csr_matrix(fd), exact)
    scale = float(abs(exact).max())
    t_ours, t_scipy = median(times["jacpipe"]), median(times["scipy"])
    m = {k: median(v) for k, v in parts.items()}
    report.table(
        f"(2) end to end, heat n = {n:,}, one process, median of {repeats}",
        ["method", "steps", "time", "time / SciPy", "max |error| / max |J|"],
        [["jacpipe: detect + colour + compressed AD",
          f"detect {seconds(m['detect'])}, colour {seconds(m['colour'])} "
          f"({coloring.num_colors} colours), evaluate {seconds(m['evaluate'])}",
          seconds(t_ours), f"{t_ours / t_scipy:.2f}x", f"{ours_err / scale:.1e}"],
         ["jacpipe without detection (pattern given, as SciPy's is): colour + evaluate",
          "", seconds(m["colour"] + m["evaluate"]),
          f"{(m['colour'] + m['evaluate']) / (m['group'] + m['fd']):.2f}x (of SciPy's steps)",
          f"{ours_err / scale:.1e}"],
         ["SciPy: group_columns + approx_derivative 2-point (hand pattern given)",
          f"group {seconds(m['group'])} ({groups} groups), evaluate {seconds(m['fd'])}",
          seconds(t_scipy), "1.00x", f"{fd_err / scale:.1e}"]],
    )
    report.target(Target("end to end: jacpipe (detect + colour + evaluate) / SciPy (group + "
                         "2-point)", t_ours / t_scipy, VS_SCIPY, higher_is_better=False,
                         note=f"errors vs exact: jacpipe {ours_err / scale:.1e}, SciPy "
                              f"{fd_err / scale:.1e}"))
    report.facts["end_to_end"] = {"n": n, "times_s": times, "parts_median_s": m,
                                  "colors": coloring.num_colors, "scipy_groups": groups,
                                  "jacpipe_max_rel_error": ours_err / scale,
                                  "scipy_max_rel_error": fd_err / scale}


def bench_coloring(report: Report, N: int, repeats: int) -> None:
    """Section (3)."""
    from scipy.optimize._numdiff import group_columns

    from pipeline.sparse import stencil_pattern
    from pipeline.sparse.coloring import choose_coloring, column_coloring

    pattern = stencil_pattern(N, 5)
    held: dict[str, Any] = {}
    times = interleaved(
        {"column_coloring": lambda: column_coloring(pattern),
         "choose_coloring": lambda: choose_coloring(pattern).colors,
         "group_columns": lambda: group_columns(pattern)},
        repeats=repeats, warmup=1, after=held.__setitem__,
    )
    t = {k: median(v) for k, v in times.items()}
    counts = {k: int(v.max()) + 1 for k, v in held.items()}
    report.table(
        f"(3) colouring the {N * N:,}-column 5-point stencil, median of {repeats}",
        ["method", "colours", "time", "time / SciPy"],
        [[k, counts[k], seconds(t[k]), f"{t[k] / t['group_columns']:.2f}x"] for k in t],
    )
    report.target(Target("colouring: column_coloring / SciPy group_columns",
                         t["column_coloring"] / t["group_columns"], VS_SCIPY,
                         higher_is_better=False,
                         note=f"{counts['column_coloring']} colours vs SciPy's "
                              f"{counts['group_columns']}"))
    report.facts["coloring"] = {"N": N, "times_s": times, "colors": counts}


def bench_give_up(report: Report, size: int, repeats: int) -> None:
    """Section (4)."""
    from jobs.mlp import build
    from pipeline.sparse import trace_sparsity

    problem = build(n=size, m=size)
    held: dict[str, Any] = {}
    times = interleaved(
        {"give up": lambda: trace_sparsity(problem.fn, problem.x),
         "forward": lambda: problem.fn(problem.x)},
        repeats=repeats, after=held.__setitem__,
    )
    t_give, t_forward = median(times["give up"]), median(times["forward"])
    found = held["give up"]
    report.table(
        f"(4) giving up on a dense problem: jobs.mlp n = m = {size:,}, median of {repeats}",
        ["step", "time", "in forward evaluations", "result"],
        [["fn(x) (forward)", seconds(t_forward), "1", ""],
         ["trace_sparsity", seconds(t_give), f"{t_give / t_forward:.1f}",
          f"dense={found.dense}: {found.reason}"]],
    )
    report.target(Target("mlp give-up / forward evaluation", t_give / t_forward,
                         GIVE_UP_VS_FORWARD, higher_is_better=False,
                         note=f"dense={found.dense}"))
    report.facts["give_up"] = {"size": size, "times_s": times, "dense": found.dense,
                               "reason": found.reason}


def write_markdown(report: Report, command: str) -> None:
    from benchmarks.harness import markdown_table

    parts = ["# Automatic sparsity detection and numba colourings (issue 12)", "",
             f"Reproduce: `{command}` (results: `benchmarks/results/sparsity.json`).", "",
             f"Machine: {report.facts['machine_note']}.", ""]
    for table in report.tables:
        parts += [f"## {table['title']}", "", markdown_table(table["headers"], table["rows"]), ""]
    parts += ["## Targets", ""]
    parts += [f"- {t.line().strip()}" for t in report.targets]
    parts += ["", "## Notes", "",
              "- The machine is shared (2 cores, other engineers' test runs): between runs "
              "an hour apart the end-to-end ratio moved between 0.76x and 1.2x and the "
              "detection ratio between 19x and 44x; compare the rows of one table, which "
              "are timed interleaved.",
              "- SciPy gets the hand-written pattern (it has no detection); jacpipe detects "
              "it. jacpipe's values are exact to rounding, SciPy's 2-point values carry "
              "about 1e-8 relative error.",
              "- jacpipe's evaluation step (`sparse_jacobian_rows`: 5 JVPs vectorised with "
              "vmap) is about 90% the batched forward of the residual itself, i.e. torch's "
              "forward-mode AD, not the colouring.",
              "- Detection of the heat residual: the recording pass (one forward pass "
              "under a dispatch mode), then the pattern propagation (row takes and unions "
              "of 1e6-row boolean CSR matrices); no dense probe (its graph has only "
              "elementwise and movement ops, NOTE: [probe only where propagation is not "
              "cheaper]).",
              "- Giving up on the MLP: the recording pass, then the dense probe (one "
              "forward pass with autograd recording and 2 single-row backward passes); "
              "propagating instead cost about 15 forward passes.",
              "- Timings exclude numba's first compilation in a fresh process (about 5-10 s, "
              "then cached on disk next to pipeline/coloring.py when that is writable).",
              ""]
    MARKDOWN.write_text("\n".join(parts))
    print(f"wrote {MARKDOWN}")


def main(argv: list[str] | None = None) -> int:
    import os

    import torch

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=None, help="heat grid side (n = N^2)")
    p.add_argument("--mlp", type=int, default=None, help="mlp n = m")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    N = args.N or (200 if args.quick else 1000)
    size = args.mlp or (4000 if args.quick else 20000)
    repeats = max(3, args.repeats or 3)
    torch.set_num_threads(args.threads)
    report = Report("sparsity", quick=args.quick)
    load = os.getloadavg()
    report.facts["machine_note"] = (
        f"{os.cpu_count()} CPUs, torch {torch.__version__} with {args.threads} thread(s); "
        f"a shared machine, load average {load[0]:.1f} at the start")
    problem, _ = bench_detection(report, N, repeats)
    bench_end_to_end(report, problem, N, repeats)
    del problem
    bench_coloring(report, N, repeats)
    bench_give_up(report, size, repeats)
    report.facts["loadavg_end"] = os.getloadavg()
    report.facts["machine_note"] += f", {report.facts['loadavg_end'][0]:.1f} at the end"
    report.finish(args.json)
    if not args.quick and args.json is None:
        write_markdown(report, "python -m benchmarks.sparsity" + (f" --N {N}" if args.N else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
