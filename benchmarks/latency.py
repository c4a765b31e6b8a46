"""Latency of the front door: `jacpipe` commands as a user types them, against one script.

Every case is a fresh process (interpreter start and imports included), timed
wall-clock from start to exit, interleaved round by round, and reported as the
ratio of medians to one in-process script doing the same job the plainest way:
start Python, import torch, build the job, ``torch.func.jacrev``, one
``pq.write_table``. Cases:

* a bad option (``jacpipe run mlp --device tpu``): refused before any work;
* ``jacpipe run mlp -p n=100 -p m=100`` into a fresh folder;
* the same command again on the finished folder (a rerun: nothing to compute);
* the quick tour's run (mlp 2000 x 1500, 8 shards);
* ``make run``'s job (mlp 2000 x 2000, 8 shards, ``--no-resume --verify``),
  with the time until its first part file is committed.

    python -m benchmarks.latency             # 3 rounds, ~5 min on 2 cores
    python -m benchmarks.latency --quick     # 1 round
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Report, Target, interleaved, median, parser, seconds

ROOT = Path(__file__).resolve().parents[1]
#: The in-process script: what a user would write without jacpipe.
SCRIPT = """
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, torch
from jobs.mlp import build
n, m, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
p = build(n=n, m=m)
J = torch.func.jacrev(p.fn)(p.x).reshape(m, n).numpy()
values = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(J).reshape(-1)), n)
pq.write_table(pa.table({"row": np.arange(m), "values": values}), out, compression="zstd")
"""
TARGETS = {"bad option": 1.5, "run 100 x 100": 1.5}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _jacpipe(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"jacpipe {' '.join(args)} exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-500:]}")
    return proc


def _script(n: int, m: int, out: Path) -> None:
    subprocess.run([sys.executable, "-c", SCRIPT, str(n), str(m), str(out)], cwd=ROOT,
                   env=_env(), check=True, capture_output=True)


def _first_shard(args: list[str], out: Path, firsts: list[float]) -> None:
    """Run ``jacpipe ARGS`` and note when the first part file appears in ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and out.is_dir() and any(out.glob("part-*.parquet")):
            first = time.perf_counter() - t0
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"jacpipe {' '.join(args)} exited {proc.returncode}: "
                           f"{(proc.stderr.read() if proc.stderr else '')[-500:]}")
    firsts.append(first if first is not None else time.perf_counter() - t0)


def _cases(root: Path, firsts: list[float]) -> dict[str, Any]:
    small = ["run", "mlp", "-p", "n=100", "-p", "m=100", "--out", str(root / "r100"),
             "--no-progress"]
    tour = ["run", "mlp", "-p", "n=2000", "-p", "m=1500", "--shards", "8", "--out",
            str(root / "tour"), "--no-progress"]
    make_run = ["run", "mlp", "-p", "n=2000", "-p", "m=2000", "--shards", "8", "--executor",
                "ray", "--out", str(root / "make-run"), "--no-resume", "--verify",
                "--no-progress"]

    def fresh_small() -> None:
        shutil.rmtree(root / "r100", ignore_errors=True)
        _jacpipe(*small)

    def bad_option() -> None:
        assert _jacpipe("run", "mlp", "--device", "tpu", check=False).returncode == 2

    def fresh_tour() -> None:
        shutil.rmtree(root / "tour", ignore_errors=True)
        _jacpipe(*tour)

    return {
        "script 100 x 100": lambda: _script(100, 100, root / "s100.parquet"),
        "bad option": bad_option,
        "run 100 x 100": fresh_small,
        "rerun of a finished run": lambda: _jacpipe(*small),
        "script 2000 x 1500": lambda: _script(2000, 1500, root / "s2000x1500.parquet"),
        "quick tour run 2000 x 1500": fresh_tour,
        "script 2000 x 2000": lambda: _script(2000, 2000, root / "s2000.parquet"),
        "make run (--verify)": lambda: _first_shard(make_run, root / "make-run", firsts),
    }


#: case -> the in-process script it is compared with.
BASELINE = {
    "bad option": "script 100 x 100",
    "run 100 x 100": "script 100 x 100",
    "rerun of a finished run": "script 100 x 100",
    "quick tour run 2000 x 1500": "script 2000 x 1500",
    "make run (--verify)": "script 2000 x 2000",
}


def main(argv: list[str] | None = None) -> int:
    """Time every case, print the table, write ``benchmarks/results/latency.json``."""
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    repeats = max(1, args.repeats or (1 if args.quick else 3))
    report = Report("latency", quick=args.quick)
    root = Path(tempfile.mkdtemp(prefix="jacpipe-latency-"))
    firsts: list[float] = []
    try:
        print(f"{repeats} interleaved round(s), every case a fresh process ...", flush=True)
        times = interleaved(_cases(root, firsts), repeats=repeats, warmup=0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for name, ts in times.items():
        base = BASELINE.get(name)
        ratio = f"{median(ts) / median(times[base]):.2f}x" if base else "1 (baseline)"
        rows.append([name, seconds(median(ts)), seconds(min(ts)), ratio])
    first = median(firsts)
    rows.append(["make run: first shard committed", seconds(first), seconds(min(firsts)),
                 f"{first / median(times['script 2000 x 2000']):.2f}x"])
    report.table(f"wall seconds per command (fresh process), median of {repeats}",
                 ["case", "median", "min", "time / in-process script"], rows)
    for name, goal in TARGETS.items():
        report.target(Target(f"{name} / in-process script", median(times[name])
                             / median(times[BASELINE[name]]), goal, higher_is_better=False))
    report.facts = {"times_s": times, "first_shard_s": firsts, "baseline_of": BASELINE,
                    "script": SCRIPT}
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
