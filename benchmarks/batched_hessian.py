"""Per-sample Jacobians and a dense Hessian: jacpipe's engine against torch, side by side.

(a) robot_arm per-sample Jacobians (12 x 6 each) for B samples: jacpipe's
    ``iter_batched_rows`` (rev and fwd, a few chunk sizes) against a loop of
    ``torch.autograd.functional.jacobian`` over samples (timed on a subset and
    extrapolated to B, which the output says) and ``torch.func.vmap(jacrev)``.
(b) the dense Hessian of f(x) = logsumexp(tanh(W x)) + ½‖x‖², W of shape
    (n / 4) x n: jacpipe's ``iter_hessian_rows`` (rev and fwd, a few chunk
    sizes, plus the chunk the worker's planner picks under the memory budget)
    against ``torch.autograd.functional.hessian``, ``torch.func.hessian`` and
    the hand-derived Wᵀ D W - q qᵀ + I as the limit.

Every method runs in a fresh subprocess (``--child``), so its peak RSS
(``ru_maxrss``) is its own; times are medians of ``--reps`` runs (>= 3). All
results are checked against the hand-derived Hessian / the per-sample loop
through probe entries. Writes ``benchmarks/results/batched_hessian.json`` and
``benchmarks/batched_hessian.md`` (``--quick``: ``results/batched_hessian-quick.*``).

Usage::

    python -m benchmarks.batched_hessian            # B = 100,000, n = 4000
    python -m benchmarks.batched_hessian --quick    # B = 10,000,  n = 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "batched_hessian.json"
MARKDOWN = HERE / "batched_hessian.md"
GiB = 2**30

#: Targets of issue 7: (name, description, comparison).
TARGETS = {
    "batched_vs_loop": ("(a) jacpipe vs autograd.functional.jacobian loop", ">=", 100.0),
    "batched_vs_vmap": ("(a) jacpipe vs torch.func.vmap(jacrev)", ">=", 1.0),
    "hessian_vs_autograd": ("(b) jacpipe vs autograd.functional.hessian", ">=", 4.0),
    "hessian_vs_func": ("(b) jacpipe vs torch.func.hessian", ">=", 1.0),
    "hessian_vs_hand": ("(b) jacpipe time / hand-derived Wᵀ·D·W time", "<=", 1.5),
    "hessian_memory": ("(b) jacpipe peak RSS / memory budget", "<=", 1.0),
}


# ---------------------------------------------------------------------------
# The problems
# ---------------------------------------------------------------------------


def hessian_problem(n: int, dtype: str, seed: int = 0) -> tuple[Any, Any, Any]:
    """``(f, x, W)`` of the dense Hessian case: f(x) = logsumexp(tanh(W x)) + ½‖x‖²."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    w = (torch.randn(n // 4, n, generator=g, dtype=torch.float64) / n**0.5).to(dt)
    x = torch.randn(n, generator=g, dtype=torch.float64).to(dt)

    def f(v: Any) -> Any:
        return torch.logsumexp(torch.tanh(w @ v), 0) + 0.5 * (v * v).sum()

    return f, x, w


def _hand_terms(x: Any, w: Any) -> tuple[Any, Any]:
    """``d`` and ``q`` of :func:`hand_hessian`'s NOTE: H = Wᵀ diag(d) W - q qᵀ + I."""
    import torch

    t = torch.tanh(w @ x)
    p = torch.softmax(t, 0)
    u = 1 - t * t
    return p * u * u - 2 * p * t * u, w.T @ (p * u)


def hand_hessian(x: Any, w: Any) -> Any:
    """The Hessian of :func:`hessian_problem`'s f, derived by hand.

    NOTE: with z = W x, t = tanh z, p = softmax t and u = 1 - t², the gradient
    is Wᵀ (p ∘ u) + x, and the Hessian is
        H = Wᵀ diag(p u² - 2 p t u) W - (Wᵀ q)(Wᵀ q)ᵀ + I,   q = p ∘ u
    (diag(p) - p pᵀ is the Jacobian of the softmax). One (n x k)(k x n) product.
    """
    import torch

    d, q = _hand_terms(x, w)
    h = w.T @ (d[:, None] * w)
    h -= torch.outer(q, q)
    h.diagonal().add_(1)
    return h


def two_product_rows(x: Any, w: Any, chunk: int) -> Any:
    """The same Hessian by rows, hand-written the way any row method must compute it.

    NOTE: a row block H[R, :] = e_Rᵀ H costs a method that is handed the basis
    rows e_R (AD rows: a VJP of the gradient) two products with W: e_R Wᵀ
    (k x n x c, the one-hot rows meet the first layer as a dense product) and
    then (·) D W (k x n x c). :func:`hand_hessian` needs one, since it knows
    that e_R Wᵀ is a slice of W. This is that floor without any AD overhead:
    the ratio of its time to the hand-derived time is what no row method can
    beat without knowing its basis is one-hot.
    """
    import torch

    n = x.numel()
    d, q = _hand_terms(x, w)
    out = x.new_empty(n, n)
    for a in range(0, n, chunk):
        c = min(chunk, n - a)
        basis = x.new_zeros(c, n)
        basis[torch.arange(c), torch.arange(a, a + c)] = 1
        block = ((basis @ w.T) * d) @ w  # the two products
        block -= torch.outer(q[a : a + c], q)
        block += basis
        out[a : a + c] = block
    return out


# ---------------------------------------------------------------------------
# One method in one fresh process
# ---------------------------------------------------------------------------


def _probe(result: Any, rows: int) -> dict[str, Any]:
    """A few entries and the norm of a result, to check methods against each other."""
    import torch

    flat = result.reshape(rows, -1).double()
    idx = torch.linspace(0, rows - 1, 16).round().long()
    cols = torch.linspace(0, flat.shape[1] - 1, 16).round().long()
    return {"norm": float(flat.norm()), "probe": flat[idx][:, cols].reshape(-1).tolist()}


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _time(fn: Any, reps: int) -> tuple[dict[str, list[float]], Any]:
    """Wall and process-CPU seconds of ``reps`` calls, and the last result."""
    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    out = None
    for _ in range(reps):
        out = None  # free the last result before the next run
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times["cpu"].append(time.process_time() - c0)
        times["wall"].append(time.perf_counter() - w0)
    return times, out


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one method as described by ``spec`` and return its measurements."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    reps = int(spec["reps"])
    if spec["case"] == "batched":
        return _child_batched(spec, reps)
    return _child_hessian(spec, reps)


def _child_batched(spec: dict[str, Any], reps: int) -> dict[str, Any]:
    import torch
    from torch.autograd.functional import jacobian

    from jobs.robot_arm import build
    from pipeline.maths import iter_batched_rows

    problem = build(batch=int(spec["batch"]), dtype=spec["dtype"])
    fn, xs = problem.fn, problem.x
    b, n = xs.shape
    m = fn(xs[0]).numel()
    method = spec["method"]
    info: dict[str, Any] = {}
    subset = int(spec["subset"])  # the loop's samples; every method is probed on them
    if method == "loop":

        def run() -> Any:
            return torch.stack([jacobian(fn, xs[i]) for i in range(subset)])

        times, out = _time(run, reps)
        scale = b / subset
        info = {"extrapolated_from": subset, "subset_seconds": times}
        times = {k: [t * scale for t in v] for k, v in times.items()}
        check = _probe(out, subset * m)
    elif method == "vmap_jacrev":
        times, out = _time(lambda: torch.func.vmap(torch.func.jacrev(fn))(xs), reps)
        check = _probe(out[:subset], subset * m)
    else:  # jacpipe rev / fwd
        mode = spec["mode"]
        samples = int(spec["samples_per_pass"])
        chunk = samples * (m if mode == "rev" else n)

        def run() -> Any:
            out = xs.new_empty(b * m, n)
            for a, block in iter_batched_rows(fn, xs, 0, b * m, chunk_size=chunk, method=mode):
                out[a : a + len(block)] = block
            return out.view(b, m, n)

        times, out = _time(run, reps)
        info = {"chunk_size": chunk, "samples_per_pass": samples}
        check = _probe(out[:subset], subset * m)
    return {"times": times, "peak_rss": _peak_rss(), "check": check, **info}


def _child_hessian(spec: dict[str, Any], reps: int) -> dict[str, Any]:
    import torch

    from pipeline.maths import iter_hessian_rows
    from pipeline.runner import plan

    n = int(spec["n"])
    f, x, w = hessian_problem(n, spec["dtype"])
    method = spec["method"]
    info: dict[str, Any] = {}
    if method == "autograd_hessian":
        times, out = _time(lambda: torch.autograd.functional.hessian(f, x), reps)
    elif method == "func_hessian":
        times, out = _time(lambda: torch.func.hessian(f)(x), reps)
    elif method == "hand":
        times, out = _time(lambda: hand_hessian(x, w), reps)
    elif method == "floor":
        times, out = _time(lambda: two_product_rows(x, w, int(spec["chunk"])), reps)
    else:  # jacpipe rev / fwd, a fixed chunk or the planner's
        mode = spec["mode"]
        chunk = spec.get("chunk")
        if chunk is None:
            # What a worker would pick: its measured activations, its baseline.
            import psutil

            from pipeline.problem import Problem
            from pipeline.runner.worker import activation_numel

            itemsize = x.element_size()
            group = plan.group_rows(n, itemsize)
            chunk = plan.chunk_rows(
                budget=int(spec["budget"]),
                baseline=psutil.Process().memory_info().rss,
                m=n,
                n=n,
                activations=activation_numel(Problem(fn=f, x=x, kind="hessian")),
                itemsize=itemsize,
                group_bytes=2 * group * n * itemsize,
                method=mode,
            )
            chunk = min(chunk, group) if mode == "rev" else chunk
        chunk = int(chunk)

        def run() -> Any:
            out = x.new_empty(n, n)
            for a, block in iter_hessian_rows(f, x, 0, n, chunk_size=chunk, method=mode):
                out[a : a + len(block)] = block
            return out

        times, out = _time(run, reps)
        info = {"chunk_size": chunk}
    return {"times": times, "peak_rss": _peak_rss(), "check": _probe(out, n), **info}


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter; returns its JSON or an ``error``."""
    cmd = [sys.executable, "-m", "benchmarks.batched_hessian", "--child", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=HERE.parent, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def _agrees(check: dict[str, Any], ref: dict[str, Any], rtol: float) -> bool:
    import math

    scale = max(abs(v) for v in ref["probe"]) or 1.0
    if not math.isclose(check["norm"], ref["norm"], rel_tol=rtol):
        return False
    return all(abs(a - b) <= rtol * scale for a, b in zip(check["probe"], ref["probe"],
                                                          strict=True))


def plan_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (case, method) to run, as child specs."""
    common = {"reps": args.reps, "threads": args.threads}
    a = {"case": "batched", "batch": args.batch, "subset": args.subset, "dtype": "float64",
         **common}
    runs = [dict(a, name="loop", label="autograd.functional.jacobian loop", method="loop"),
            dict(a, name="vmap_jacrev", label="torch.func.vmap(jacrev)", method="vmap_jacrev")]
    for mode in ("rev", "fwd"):
        for s in args.samples_per_pass:
            runs.append(dict(a, name=f"jacpipe_{mode}_s{s}", method="jacpipe", mode=mode,
                             samples_per_pass=s,
                             label=f"jacpipe {mode}, {s} samples per pass"))
    h = {"case": "hessian", "n": args.n, "dtype": args.dtype, "budget": args.budget, **common}
    runs += [dict(h, name="autograd_hessian", label="torch.autograd.functional.hessian",
                  method="autograd_hessian"),
             dict(h, name="func_hessian", label="torch.func.hessian", method="func_hessian"),
             dict(h, name="hand", label="hand-derived Wᵀ·D·W - q·qᵀ + I (limit)",
                  method="hand"),
             dict(h, name="floor", method="floor", chunk=args.chunks[1],
                  label=f"two products per row block, no AD (floor of row methods), "
                        f"chunk {args.chunks[1]}")]
    for mode, chunks in (("rev", args.chunks), ("fwd", args.chunks[-2:])):
        for c in chunks:
            runs.append(dict(h, name=f"jacpipe_{mode}_c{c}", method="jacpipe", mode=mode,
                             chunk=c, label=f"jacpipe {mode}-over-rev, chunk {c} rows"
                             if mode == "fwd" else f"jacpipe rev-over-rev, chunk {c} rows"))
    runs.append(dict(h, name="jacpipe_rev_planner", method="jacpipe", mode="rev", chunk=None,
                     label="jacpipe rev-over-rev, chunk from the worker's planner"))
    return runs


def summarize(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Medians, speed-ups, correctness and targets."""
    for r in results.values():
        if "times" in r:
            r["median"] = _median(r["times"][args.clock])
    ok = {k: r for k, r in results.items() if "median" in r}
    rtol = 1e-4 if args.dtype == "float32" else 1e-8

    # Correctness: probes of the first `subset` samples against the loop (the
    # reference), of the Hessian against the hand-derived one.
    for k, r in ok.items():
        if r["case"] == "batched" and k != "loop" and "loop" in ok:
            r["agrees"] = _agrees(r["check"], ok["loop"]["check"], 1e-10)
        if r["case"] == "hessian" and k != "hand" and "hand" in ok:
            r["agrees"] = _agrees(r["check"], ok["hand"]["check"], rtol)
    a_names = [k for k in ok if k.startswith("jacpipe_") and ok[k]["case"] == "batched"]
    h_names = [k for k in ok if k.startswith("jacpipe_") and ok[k]["case"] == "hessian"]
    a_best = min(a_names, key=lambda k: ok[k]["median"]) if a_names else None
    h_best = min(h_names, key=lambda k: ok[k]["median"]) if h_names else None

    def ratio(num: str | None, den: str | None) -> float | None:
        if num is None or den is None or num not in ok or den not in ok:
            return None
        return ok[num]["median"] / ok[den]["median"]

    values = {
        "batched_vs_loop": ratio("loop", a_best),
        "batched_vs_vmap": ratio("vmap_jacrev", a_best),
        "hessian_vs_autograd": ratio("autograd_hessian", h_best),
        "hessian_vs_func": ratio("func_hessian", h_best),
        "hessian_vs_hand": ratio(h_best, "hand"),
        "hessian_memory": (ok[h_best]["peak_rss"] / args.budget) if h_best else None,
    }
    # Not targets: where the hand-derived limit sits for any row method.
    floor = {
        "floor_vs_hand": ratio("floor", "hand"),
        "jacpipe_vs_floor": ratio(h_best, "floor"),
        "planner_vs_best": ratio("jacpipe_rev_planner", h_best),
    }
    targets = []  # the shape benchmarks.run_all reads: name, met, ...
    for key, (label, op, goal) in TARGETS.items():
        v = values[key]
        met = v is not None and (v >= goal if op == ">=" else v <= goal)
        targets.append({"name": key, "label": label, "value": v, "goal": f"{op} {goal:g}",
                        "met": met,
                        "status": "MET" if met else ("NOT RUN" if v is None else "MISSED")})
    return {"best_batched": a_best, "best_hessian": h_best, "targets": targets,
            "floor": floor}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    return {
        "command": "python -m benchmarks.batched_hessian" + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --clock {args.clock}" if args.clock != "wall" else ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "machine": platform.machine(),
        "batch": args.batch,
        "loop_subset": args.subset,
        "n": args.n,
        "dtype_hessian": args.dtype,
        "memory_budget": args.budget,
        "reps": args.reps,
        "clock": args.clock,
    }


_CLOCKS = {
    "wall": "wall-clock seconds",
    "cpu": "process CPU seconds (one thread: robust to other load on a shared machine)",
}


def _fmt_s(v: float) -> str:
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def markdown(env: dict[str, Any], results: dict[str, Any], summary: dict[str, Any]) -> str:
    """The results as Markdown tables (pasted into the README)."""
    lines = [
        "# Per-sample Jacobians and dense Hessians: jacpipe vs torch",
        "",
        f"Reproduce: `{env['command']}` (writes `benchmarks/results/batched_hessian.json`).",
        f"Measured on {env['cpu_count']} CPU cores, {env['torch_threads']} torch thread(s), "
        f"torch {env['torch']}, load average {env['load_average_at_start']:.1f} at start; "
        f"{_CLOCKS[env['clock']]}, medians of {env['reps']} runs, each method in a fresh "
        "process (peak RSS = its `ru_maxrss`, interpreter and torch included).",
        "",
    ]
    for case, title in (
        ("batched", f"(a) robot_arm per-sample Jacobians (12 x 6), B = {env['batch']:,}, "
                    "float64"),
        ("hessian", f"(b) dense Hessian n = {env['n']:,}, f(x) = logsumexp(tanh(W x)) + "
                    f"½‖x‖², W {env['n'] // 4:,} x {env['n']:,}, {env['dtype_hessian']}"),
    ):
        best = summary["best_batched" if case == "batched" else "best_hessian"]
        lines += [f"## {title}", "", "| method | seconds | time / jacpipe best | "
                  "peak RSS (MiB) | matches |", "|---|---:|---:|---:|:---:|"]
        for name, r in results.items():
            if r.get("case") != case:
                continue
            if "median" not in r:
                lines.append(f"| {r['label']} | {r.get('error', 'failed')} | | | |")
                continue
            label = r["label"] + (" **(best)**" if name == best else "")
            if name == "loop":
                label += f" (timed on {r['extrapolated_from']} samples, extrapolated ×" \
                         f"{env['batch'] / r['extrapolated_from']:g})"
            if "chunk_size" in r and name.endswith("planner"):
                label += f" ({r['chunk_size']} rows)"
            speed = results[best]["median"] and r["median"] / results[best]["median"]
            match = {True: "yes", False: "NO"}.get(r.get("agrees"), "ref")
            lines.append(f"| {label} | {_fmt_s(r['median'])} | {speed:.2f} | "
                         f"{r['peak_rss'] / 2**20:.0f} | {match} |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | goal | status |", "|---|---:|---:|:---:|"]
    for t in summary["targets"]:
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['label']} | {v} | {t['goal']} | {t['status']} |")
    fl = summary.get("floor", {})

    def _r(key: str) -> str:
        v = fl.get(key)
        return "-" if v is None else f"{v:.2f}"

    lines += [
        "",
        "Notes: jacpipe rows are generic AD, so one Hessian row costs a VJP of the gradient",
        "(two products with W, 4nk flops) where the hand-derived Wᵀ·D·W needs one (n x k)(k x n)",
        "product (2nk flops per row): the flop ratio is 2. The floor row does exactly those two",
        "products per row block by hand, without AD: it takes "
        f"{_r('floor_vs_hand')}x the hand-derived time, and jacpipe's best takes "
        f"{_r('jacpipe_vs_floor')}x the floor's",
        "(the AD overhead). A 1.5x target is out of reach for any method handed basis rows",
        "that does not know they are one-hot. Rev-over-rev beats fwd-over-rev at every chunk",
        "size measured, hence `--method auto` = rev for Hessians. The planner row uses the",
        f"chunk a worker picks under the memory budget ({_r('planner_vs_best')}x the best "
        "fixed chunk's time).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every method in its own process, report and save."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="B = 10,000 and n = 1000")
    p.add_argument("--reps", type=int, default=3, help="runs per method (>= 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="compare wall time, or process CPU time (needs --threads 1)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                   help="dtype of the Hessian case")
    p.add_argument("--memory-budget", dest="budget", type=float, default=2.0,
                   help="GiB allowed to the jacpipe Hessian process")
    p.add_argument("--only", choices=["batched", "hessian"], default=None)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per method")
    p.add_argument("--out", type=Path, default=None, help=f"JSON [{RESULTS}]")
    p.add_argument("--markdown", type=Path, default=None, help=f"Markdown [{MARKDOWN}]")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.reps < 3:
        p.error("--reps must be at least 3 (the medians need three runs)")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu measures one thread's work: add --threads 1")
    args.budget = int(args.budget * GiB)
    quick = "-quick" if args.quick else ""  # a quick run never overwrites the full results
    args.out = args.out or RESULTS.with_name(f"batched_hessian{quick}.json")
    args.markdown = args.markdown or (
        RESULTS.with_name("batched_hessian-quick.md") if args.quick else MARKDOWN
    )
    args.batch, args.subset, args.n = (10_000, 100, 1000) if args.quick else (100_000, 500, 4000)
    args.samples_per_pass = [1000, 10_000] if args.quick else [1000, 10_000, 100_000]
    args.chunks = [128, 256, 512] if args.quick else [256, 512, 1024]
    env = environment(args)
    print(f"jacpipe benchmark: {env['command']}  (load average {env['load_average_at_start']:.1f})")
    results: dict[str, dict[str, Any]] = {}
    for spec in plan_runs(args):
        if args.only and spec["case"] != args.only:
            continue
        t0 = time.perf_counter()
        out = run_child(spec, args.timeout)
        results[spec["name"]] = {**{k: spec[k] for k in ("case", "label")}, **out}
        shown = out.get("error") or f"median {_median(out['times'][args.clock]):.3f} s, " \
                                     f"peak RSS {out['peak_rss'] / 2**20:.0f} MiB"
        print(f"  {spec['label']:<58} {shown}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    summary = summarize(args, results)
    if any(r.get("agrees") is False for r in results.values()):
        print("WARNING: some methods disagree with the reference (see 'matches')")
    text = markdown(env, results, summary)
    print()
    print(text)
    for t in summary["targets"]:
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"{t['status']:<6} {t['label']}: {v} (goal {t['goal']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "results": results, **summary},
                                   indent=1) + "\n")
    args.markdown.write_text(text)
    print(f"\nwrote {args.out} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
