"""Engine rows against torch's Jacobians, side by side in one process.

Cases: an MLP 2000 -> 512 -> 2000 (float32), a tall MLP 16 -> 512 -> 50,000
(float32), and the heat job (N = 64, float64, so 4096 x 4096). For each,
``pipeline.maths.engine.jacobian_rows`` over all rows, with the method ``auto``
picks and the chunk size the memory model picks (as a worker would), against
``torch.autograd.functional.jacobian`` (default loop and ``vectorize=True``),
``torch.func.jacrev`` and ``torch.func.jacfwd``; a few fixed chunk sizes of the
engine run alongside. All in one process with torch's default threads, timed in
interleaved rounds (the fast methods 9 rounds, the slow autograd baselines 3);
the tables give medians and min, and ``time / engine time``: a baseline's median
over the engine's (above 1: the engine is faster).

On the tall case the row-by-row methods (autograd's loop, ``jacrev``) would
take minutes; they are timed on the first rows only and scaled to all rows
(marked "est."), which is exact up to noise as every row costs the same.

    python -m benchmarks.engine            # ~5 minutes on 2 cores
    python -m benchmarks.engine --quick    # small sizes, ~30 s
    python -m benchmarks.engine --compiled # compile="on" against "off" (engine-compiled.json)

``--compiled`` times instead the compiled passes (NOTE: [Compiled row passes])
against the eager ones on the dense rows, Hessian rows, per-sample rows and a
Laplacian, interleaved, with the one-time compile seconds and the largest
difference from eager.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import Report, Target, interleaved, median, parser, seconds

#: Rounds of the slow baselines (autograd's loop and vectorize, the estimated
#: row-by-row ones); the fast methods get ``--repeats`` interleaved rounds.
SLOW_REPEATS = 3


@dataclass
class Case:
    name: str
    build: Callable[[], Any]
    fixed_chunks: tuple[int | None, ...]
    sliced_rows: int | None = None  # tall: row-by-row baselines on this many rows, scaled


def cases(quick: bool) -> list[Case]:
    from jobs import heat, mlp

    if quick:
        return [
            Case("mlp 500x500", lambda: mlp.build(n=500, m=500, hidden=128), (None, 128)),
            Case("tall 5,000x16", lambda: mlp.build(n=16, m=5000, hidden=128), (None, 4), 500),
            Case("heat N=24", lambda: heat.build(N=24, pattern=False), (None, 64)),
        ]
    return [
        Case("mlp 2000x2000", lambda: mlp.build(n=2000, m=2000, hidden=512), (None, 256, 1000)),
        Case("tall 50,000x16", lambda: mlp.build(n=16, m=50_000, hidden=512), (None, 4), 2000),
        Case("heat N=64", lambda: heat.build(N=64, pattern=False), (None, 64, 256)),
    ]


def model_choice(fn: Any, x: Any, m: int, n: int) -> tuple[str, int]:
    """The method and chunk size jacpipe would use for one shard of all rows."""
    import psutil

    from pipeline.maths import engine
    from pipeline.runner import plan

    method = plan.choose_method("auto", m=m, n=n, shards=1)
    itemsize = x.element_size()
    chunk = plan.chunk_rows(
        budget=plan.default_memory_budget(psutil.virtual_memory().total, 1),
        baseline=psutil.Process().memory_info().rss,
        m=m,
        n=n,
        activations=engine.intermediate_numel(fn, x),
        itemsize=itemsize,
        group_bytes=0,
        method=method,
        rows=m,
    )
    if method == "rev":  # as the worker: never more than one Parquet row group
        chunk = min(chunk, plan.group_rows(n, itemsize))
    return method, chunk


def run_case(case: Case, repeats: int, report: Report) -> dict[str, float]:
    import torch

    from pipeline.maths import jacobian_rows

    problem = case.build()
    fn, x = problem.fn, problem.x
    n = x.numel()
    m = fn(x).numel()
    method, chunk = model_choice(fn, x, m, n)
    chunk = min(chunk, m if method == "rev" else n)
    engine_name = f"jacpipe engine ({method}, chunk {chunk}, model)"
    methods: dict[str, Callable[[], Any]] = {
        engine_name: lambda: jacobian_rows(fn, x, 0, m, chunk_size=chunk, method=method),
    }
    for c in case.fixed_chunks:
        if c != chunk and not (c is None and chunk == (m if method == "rev" else n)):
            methods[f"jacpipe engine ({method}, chunk {c or 'all'})"] = (
                lambda c=c: jacobian_rows(fn, x, 0, m, chunk_size=c, method=method)
            )
    scale: dict[str, float] = {}
    if case.sliced_rows:
        k = case.sliced_rows
        head = lambda v: fn(v).reshape(-1)[:k]  # noqa: E731 - a one-line function of v
        methods["torch.func.jacfwd"] = lambda: torch.func.jacfwd(fn)(x)
        methods["autograd.functional.jacobian (fwd-mode, vectorize)"] = lambda: (
            torch.autograd.functional.jacobian(fn, x, vectorize=True, strategy="forward-mode")
        )
        methods[f"torch.func.jacrev (est. from {k:,} rows)"] = lambda: torch.func.jacrev(head)(x)
        loop_rows = max(1, k // 4)
        head_loop = lambda v: fn(v).reshape(-1)[:loop_rows]  # noqa: E731
        methods[f"autograd.functional.jacobian (loop, est. from {loop_rows:,} rows)"] = (
            lambda: torch.autograd.functional.jacobian(head_loop, x)
        )
        scale = {list(methods)[-2]: m / k, list(methods)[-1]: m / loop_rows}
    else:
        methods["autograd.functional.jacobian (loop)"] = (
            lambda: torch.autograd.functional.jacobian(fn, x)
        )
        methods["autograd.functional.jacobian (vectorize=True)"] = (
            lambda: torch.autograd.functional.jacobian(fn, x, vectorize=True)
        )
        methods["torch.func.jacrev"] = lambda: torch.func.jacrev(fn)(x)
        methods["torch.func.jacfwd"] = lambda: torch.func.jacfwd(fn)(x)

    # Correctness first: the engine's matrix against torch's.
    ref = (torch.func.jacfwd if method == "fwd" else torch.func.jacrev)(fn)(x).reshape(m, n)
    got = methods[engine_name]()
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    del ref, got

    print(f"\n{case.name}: m={m:,} n={n:,} {x.dtype}; {len(methods)} methods ...", flush=True)
    slow = {k: v for k, v in methods.items() if "autograd" in k or "est." in k}
    fast = {k: v for k, v in methods.items() if k not in slow}
    times = interleaved(fast, repeats=repeats)
    times.update(interleaved(slow, repeats=SLOW_REPEATS, warmup=0))
    times = {k: times[k] for k in methods}
    med = {k: median(v) * scale.get(k, 1.0) for k, v in times.items()}
    low = {k: min(v) * scale.get(k, 1.0) for k, v in times.items()}
    eng = med[engine_name]
    rows = [[k, seconds(med[k]), seconds(low[k]), f"{med[k] / eng:.2f}x"] for k in methods]
    report.table(
        f"{case.name} (m={m:,}, n={n:,}, {str(x.dtype).removeprefix('torch.')}), "
        f"median of {repeats} rounds ({SLOW_REPEATS} for autograd and est.)",
        ["method", "median", "min", "time / engine time"],
        rows,
    )
    report.facts[case.name] = {
        "m": m, "n": n, "dtype": str(x.dtype), "method": method, "chunk": chunk,
        "max_rel_error_vs_torch": err, "times_s": times, "scale": scale, "median_s": med,
    }
    med["__engine__"] = eng
    return med


def compiled_cases() -> dict[str, Callable[[str], Any]]:
    """name -> ``call(compile)``: one engine or Taylor call per kind of compiled pass."""
    import torch

    from pipeline.maths.engine import batched_rows, hessian_rows, jacobian_rows
    from pipeline.maths.taylor import laplacian

    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 50, generator=g)
    w1 = torch.randn(8, 64, generator=g, dtype=torch.float64)
    w2 = torch.randn(64, 1, generator=g, dtype=torch.float64)
    xj, xh = torch.randn(30, 40, generator=g), torch.linspace(-1, 1, 200, dtype=torch.float64)
    xb = torch.randn(4096, 2, generator=g, dtype=torch.float64)
    pts = torch.randn(1024, 8, generator=g, dtype=torch.float64)

    def layer(t: Any) -> Any:
        return torch.tanh(t @ w)

    def rosenbrock(x: Any) -> Any:
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    def arm(q: Any) -> Any:
        return torch.stack([q[0].cos() + (q[0] + q[1]).cos(), q[0].sin() + (q[0] + q[1]).sin()])

    def mlp(p: Any) -> Any:
        return (torch.tanh(p @ w1) @ w2).squeeze(-1)

    lap = {c: laplacian(mlp, batched=True, compile=c) for c in ("off", "on")}
    return {
        "jacobian_rows tanh(x @ W) (30, 40) -> (30, 50), float32":
            lambda c: jacobian_rows(layer, xj, 0, 1500, compile=c),
        "hessian_rows Rosenbrock n = 200": lambda c: hessian_rows(rosenbrock, xh, 0, 200,
                                                                  compile=c),
        "batched_rows 2-joint arm, B = 4096": lambda c: batched_rows(arm, xb, 0, 8192, compile=c),
        "laplacian MLP 8-64-1, 1024 points": lambda c: lap[c](pts),
    }


def compiled_main(args: Any) -> int:
    """``--compiled``: compiled passes against eager ones (NOTE: [Compiled row passes])."""
    import os
    import time

    repeats = max(3, args.repeats or 15)
    report = Report("engine-compiled", quick=args.quick)
    rows = []
    for name, call in compiled_cases().items():
        began = time.perf_counter()
        eager, got = call("off"), call("on")
        compile_seconds = time.perf_counter() - began
        diff = float((got - eager).abs().max())
        times = interleaved({"off": lambda call=call: call("off"),
                             "on": lambda call=call: call("on")},
                            repeats=repeats, warmup=1, shuffle=True)
        ratio = median(times["off"]) / median(times["on"])
        rows.append([name, seconds(median(times["off"])), seconds(median(times["on"])),
                     f"{ratio:.2f}x", f"{compile_seconds:.1f} s", f"{diff:.1e}"])
        report.target(Target(f"{name}: eager / compiled", ratio, 1.0))
    report.facts["load average after"] = list(os.getloadavg())
    report.facts["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    report.facts["threads"] = __import__("torch").get_num_threads()
    report.table(f"compile='on' against 'off', medians of {repeats} interleaved rounds",
                 ["case", "eager", "compiled", "eager / compiled", "first call (+compile)",
                  "max |compiled - eager|"], rows)
    report.finish(args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--compiled", action="store_true",
                   help="compiled passes against eager ones (engine-compiled.json)")
    args = p.parse_args(argv)
    if args.compiled:
        return compiled_main(args)
    repeats = max(3, args.repeats or (3 if args.quick else 9))
    report = Report("engine", quick=args.quick)
    sq, tall, heat = cases(args.quick)
    r = run_case(sq, repeats, report)
    eng = r["__engine__"]
    report.target(Target(f"{sq.name}: autograd loop / engine",
                         r["autograd.functional.jacobian (loop)"] / eng, 5.0))
    report.target(Target(f"{sq.name}: jacrev / engine", r["torch.func.jacrev"] / eng, 1.0))
    r = run_case(tall, repeats, report)
    report.target(Target(f"{tall.name}: jacfwd / engine",
                         r["torch.func.jacfwd"] / r["__engine__"], 1.0))
    r = run_case(heat, repeats, report)
    report.facts["heat: jacrev / engine"] = r["torch.func.jacrev"] / r["__engine__"]
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
