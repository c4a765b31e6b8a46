"""GPU benchmark: the mlp job on cuda through jacpipe vs torch's one-process tools.

Run it with ``bash benchmarks/gpu.sh`` on a machine with an NVIDIA GPU. It
prints medians, ratios and GPU memory peaks, and writes JSON.

jacpipe's path is the real one: ``jacpipe run --device cuda`` through Ray when
Ray is importable; where it is not (a GPU box without Ray), each shard runs
through ``pipeline.worker.compute_shard``, the exact body of the Ray task
(rebuild on cuda, fingerprint check, memory-budgeted chunks, Parquet write),
one shard after another in this process, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch


def _timed(fn: Any, repeats: int) -> tuple[float, int]:
    """Median seconds and peak GPU memory (bytes; 0 on a CPU smoke run)."""
    cuda = torch.cuda.is_available()
    times, peak = [], 0
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def _jacpipe(
    params: dict[str, Any], shards: int, out: str, budget: str, device: str
) -> tuple[str, Any]:
    pairs = [f"{k}={v}" for k, v in params.items()]
    try:
        import ray  # noqa: F401
    except (ImportError, ModuleNotFoundError):
        ray_ok = False
    else:
        ray_ok = True
    if ray_ok:
        import ray

        from pipeline.runner import RunOptions, run

        if not ray.is_initialized():  # start Ray before timing, as on a cluster
            ray.init(include_dashboard=False, logging_level="ERROR")

        def go() -> None:
            run(RunOptions(job="mlp", params=pairs, out=out, shards=shards, device=device,
                           memory_budget=budget, resume=False, progress=False),
                echo=lambda s: None)

        return f"jacpipe run --device {device} (Ray)", go

    from pipeline.plan import parse_size, plan_shards
    from pipeline.problem import build_problem, fingerprint, validate
    from pipeline.shard import ShardSpec
    from pipeline.worker import compute_shard

    problem = build_problem("mlp", params)
    shapes = validate(problem)
    plan, _ = plan_shards(shapes.total_rows, shards=shards)
    specs = [
        ShardSpec(
            job="mlp", params=params, fingerprint=fingerprint(problem, shapes), shapes=shapes,
            index=s.index, start=s.start, stop=s.stop, out=out, method="rev", layout="dense",
            memory_budget=parse_size(budget), threads=4, device=device, device_param=True,
            run_id="gpu", group_rows=1024,
        )
        for s in plan
    ]

    def go() -> None:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        for spec in specs:
            compute_shard(spec)

    return f"worker.compute_shard on {device}, shards in sequence, no Ray", go


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", default="16GiB")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    ap.add_argument("--no-ray", action="store_true", help="run the task body in-process")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "benchmarks/results"),
                                                   "gpu.json"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch: run this on a GPU machine")
        return 1
    from pipeline.problem import build_problem

    params = {"n": args.n, "m": args.m, "hidden": args.hidden, "dtype": "float32",
              "device": args.device}
    problem = build_problem("mlp", params)
    fn, x = problem.fn, problem.x
    out = tempfile.mkdtemp(prefix="jacpipe-gpu-")
    if args.no_ray:
        import sys

        sys.modules["ray"] = None  # type: ignore[assignment]  # import ray -> ImportError
    label, jp = _jacpipe(params, args.shards, out, args.budget, args.device)
    rows: dict[str, tuple[float, int]] = {}
    # The autograd loop is m backward passes: time it once on a slice of rows
    # would change the method, so it runs whole, once (it is the slow baseline).
    rows["torch.autograd.functional.jacobian"] = _timed(
        lambda: torch.autograd.functional.jacobian(fn, x), 1)
    rows["torch.func.jacrev"] = _timed(lambda: torch.func.jacrev(fn)(x), args.repeats)
    rows["jacpipe (" + label + ")"] = _timed(jp, args.repeats)
    shutil.rmtree(out, ignore_errors=True)
    base = rows["torch.autograd.functional.jacobian"][0]
    ours = rows["jacpipe (" + label + ")"][0]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}  mlp {args.m}x{args.n} hidden {args.hidden} float32")
    print(f"{'method':70s} {'median s':>9s} {'GPU peak':>10s} {'speed-up vs loop':>17s}")
    for name, (sec, peak) in rows.items():
        print(f"{name:70s} {sec:9.3f} {peak / 2**30:9.2f}G {base / sec:16.1f}x")
    print(f"jacpipe / jacrev time ratio: {ours / rows['torch.func.jacrev'][0]:.2f} "
          "(jacpipe also writes the Parquet result)")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": name, "args": vars(args),
                   "results": {k: {"median_s": v[0], "gpu_peak_bytes": v[1]}
                               for k, v in rows.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
