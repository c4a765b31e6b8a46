"""Run every benchmark, one at a time, and print one summary of the targets.

Each benchmark runs in its own Python process (fresh memory and thread
settings; the memory benchmark needs that), from the repository root.

    python -m benchmarks [--quick] [--only engine,parquet_io]
    python -m benchmarks.run_all --quick

``main(argv)`` is what ``make bench`` and ``jacpipe bench`` call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import RESULTS

#: In the order they run; the heavy ones last.
BENCHMARKS = ("engine", "parquet_io", "end_to_end", "memory", "batched_hessian", "sparse")
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; 0 when all ran (whatever their targets), 1 if one failed.

    Args:
        argv: ``[--quick] [--only NAME,...] [--strict]``; ``None`` reads ``sys.argv``.
    """
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of each")
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed too")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    failed, missed = [], []
    for name in names:
        print(f"\n=== benchmarks.{name}{' --quick' if args.quick else ''} ===", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick else [])
        rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s ===", flush=True)
        if rc != 0:
            failed.append(name)
            continue
        result = RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
        for t in json.loads(result.read_text())["targets"]:
            if not t["met"]:
                missed.append(f"{name}: {t['name']}")
    print("\nsummary: " + ("all benchmarks ran" if not failed else f"FAILED: {', '.join(failed)}"))
    for m in missed:
        print(f"  MISSED  {m}")
    if failed or (args.strict and missed):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
