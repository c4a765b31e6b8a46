"""Peak memory of every process of a run under ``--memory-budget``.

A 40,000 x 40,000 float32 MLP Jacobian (6.4 GB of Parquet) and the same at
m = 10,000, each run by a fresh driver process with a fresh embedded Ray, so
every worker's ``ru_maxrss`` (reported by ``compute_shard``) covers this run
only. The driver reports its own ``ru_maxrss``; a sampler in the driver also
polls the RSS of every descendant process (Ray's raylet and GCS included, for
information). The result folder is deleted afterwards.

    python -m benchmarks.memory            # ~minutes: 40k x 40k, then 10k x 40k
    python -m benchmarks.memory --quick    # 4k x 4k and 1k x 4k
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Report, Target, gib, parser

LIMIT_GIB = 1.2
GROWTH = 0.20


def _sample_tree(stop: threading.Event, peaks: dict[int, tuple[int, str]]) -> None:
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        for proc in me.children(recursive=True):
            try:
                rss = proc.memory_info().rss
                cmd = proc.cmdline()
                name = proc.name() if not cmd or "python" not in cmd[0] else " ".join(cmd[1:3])
                name = name[-60:]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if rss > peaks.get(proc.pid, (0, ""))[0]:
                peaks[proc.pid] = (rss, name)
        stop.wait(0.25)


def driver(n: int, m: int, hidden: int, budget: str, out: str) -> dict[str, Any]:
    """Run the job as ``jacpipe run`` does, in this (fresh) process; return the facts."""
    import resource

    from pipeline import RunOptions, run

    peaks: dict[int, tuple[int, str]] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_tree, args=(stop, peaks), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    summary = run(
        RunOptions(
            job="mlp",
            params=[f"n={n}", f"m={m}", f"hidden={hidden}"],
            out=out,
            memory_budget=budget,
            resume=False,
            overwrite=True,
            progress=False,
        ),
        echo=lambda _: None,
    )
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    shards = summary.manifest.to_json()["shards"]
    workers: dict[int, int] = {}
    for s in shards:
        workers[int(s["pid"])] = max(workers.get(int(s["pid"]), 0), int(s["peak_rss"]))
    size = sum(int(s["bytes"]) for s in shards)
    return {
        "n": n,
        "m": m,
        "wall_s": round(wall, 1),
        "bytes_on_disk": size,
        "shards": len(shards),
        "chunk_sizes": sorted({int(s["chunk_size"]) for s in shards}),
        "driver_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "worker_peak_rss": {str(pid): rss for pid, rss in sorted(workers.items())},
        "sampled_peak_rss": {
            str(pid): {"rss": rss, "cmd": cmd}
            for pid, (rss, cmd) in sorted(peaks.items(), key=lambda kv: -kv[1][0])[:6]
        },
    }


def _run_case(n: int, m: int, hidden: int, budget: str, root: Path) -> dict[str, Any]:
    out = root / f"mlp-{m}x{n}"
    cmd = [sys.executable, "-m", "benchmarks.memory", "--driver",
           f"{n},{m},{hidden}", "--budget", budget, "--out", str(out)]
    print(f"running {m} x {n} (hidden {hidden}) under --memory-budget {budget} ...", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"driver failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--budget", default="1GiB", help="--memory-budget of the runs")
    p.add_argument("--out", default=None, help="folder for the result (deleted afterwards)")
    p.add_argument("--driver", default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.driver:
        n, m, hidden = (int(v) for v in args.driver.split(","))
        facts = driver(n, m, hidden, args.budget, args.out)
        print(json.dumps(facts))
        return 0
    big, small, hidden = (4000, 1000, 512) if args.quick else (40_000, 10_000, 512)
    report = Report("memory", quick=args.quick)
    root = Path(args.out or tempfile.mkdtemp(prefix="jacpipe-memory-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        cases = [_run_case(big, m, hidden, args.budget, root) for m in (big, small)]
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    rows = []
    for c in cases:
        worker_peaks = list(c["worker_peak_rss"].values())
        rows.append([
            f"{c['m']:,} x {c['n']:,}",
            f"{c['bytes_on_disk'] / 1e9:.2f} GB",
            c["shards"],
            ",".join(map(str, c["chunk_sizes"])),
            f"{gib(c['driver_peak_rss']):.2f}",
            " / ".join(f"{gib(r):.2f}" for r in worker_peaks),
            f"{c['wall_s']:.0f} s",
        ])
    report.table(
        f"Peak RSS (GiB) under --memory-budget {args.budget}, float32 mlp hidden {hidden}",
        ["m x n", "on disk", "shards", "chunk", "driver", "workers", "wall"],
        rows,
    )
    others = []
    for c in cases:
        for pid, v in c["sampled_peak_rss"].items():
            if pid not in c["worker_peak_rss"]:
                others.append([f"{c['m']:,}", pid, v["cmd"], f"{gib(v['rss']):.2f}"])
    if not others:  # the local executor (quick sizes) starts no other process
        others.append(["-", "-", "none sampled (shards ran in the driver)", "-"])
    report.table("Other processes (sampled every 0.25 s; Ray's own daemons, for information)",
                 ["m", "pid", "command", "peak RSS (GiB)"], others)
    big_case, small_case = cases
    peak = max(
        max(c["driver_peak_rss"], *c["worker_peak_rss"].values()) for c in cases
    )
    report.target(Target("max peak RSS of driver and workers", gib(peak), LIMIT_GIB,
                         higher_is_better=False, unit=" GiB"))
    for who in ("driver", "worker"):
        def top(c: dict[str, Any], who: str = who) -> int:
            if who == "driver":
                return int(c["driver_peak_rss"])
            return max(c["worker_peak_rss"].values())

        growth = top(big_case, who) / top(small_case, who) - 1
        report.target(Target(
            f"{who} peak RSS growth m={small_case['m']:,} -> {big_case['m']:,}",
            100 * growth, 100 * GROWTH, higher_is_better=False, unit="%",
        ))
    report.facts = {"cases": cases, "budget": args.budget}
    report.finish(args.json)
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
