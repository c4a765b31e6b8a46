"""First Jacobian in a fresh process, jacpipe against asdex, side by side (issue 27).

Each round runs, in turn and each in a fresh interpreter, every case with
jacpipe (this checkout, and optionally a baseline checkout given by
``--baseline PATH``, e.g. ``/work/main``) and with asdex (one case per JAX
process, so each pays JAX's first-call costs as jacpipe pays its own): the
first Jacobian is detection + colouring + one evaluation (asdex: + ``jit``),
imports excluded on both sides. Also the first detection in a fresh process
(heat N = 100 in seconds, heat N = 1000 in evaluations of ``fn``), measured
as ``benchmarks/peers.py`` does. Medians over rounds; 2 torch threads.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.firstcall --baseline /work/main
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import Report, Target, parser
from benchmarks.peers import PEER_SCRIPT, case_name, peer_python

HERE = Path(__file__).resolve().parent
CASES = [("heat", 32), ("brusselator", 32), ("heat", 70), ("heat", 100), ("heat", 200)]
QUICK = [("brusselator", 32), ("heat", 100)]

_JACPIPE = """
import json, sys, time, torch
torch.set_num_threads({threads})
from benchmarks.peers import torch_case
from pipeline.sparse.coloring import choose_coloring
from pipeline.sparse.compressed import sparse_jacobian_rows
from pipeline.sparse.detect import trace_sparsity
fn, x = torch_case({job!r}, {size})
t0 = time.perf_counter()
pattern = trace_sparsity(fn, x, kind="jacobian", max_density=None).pattern
t1 = time.perf_counter()
coloring = choose_coloring(pattern, symmetric=False)
t2 = time.perf_counter()
sparse_jacobian_rows(fn, x, 0, pattern.shape[0], pattern, coloring, compile="off")
t3 = time.perf_counter()
print(json.dumps({{"detection": t1 - t0, "coloring": t2 - t1, "evaluation": t3 - t2,
                  "first": t3 - t0, "colors": coloring.num_colors,
                  "sympy": "sympy" in sys.modules}}))
"""


def jacpipe_first(root: Path, job: str, size: int, threads: int) -> dict[str, Any]:
    """jacpipe's first Jacobian in a fresh interpreter running the checkout at ``root``."""
    code = _JACPIPE.format(threads=threads, job=job, size=size)
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def asdex_first(python: str, job: str, size: int) -> dict[str, Any]:
    """asdex's first Jacobian (jit included) in a fresh JAX process, one case."""
    request = {"repeats": 1, "cases": [
        {"name": case_name(job, "jacobian", size), "job": job, "kind": "jacobian",
         "size": size}]}
    out = subprocess.run([python, str(PEER_SCRIPT), json.dumps(request)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["results"][0]


_FRONT = """
import json, sys, time, torch
torch.set_num_threads({threads})
import pipeline
w = torch.randn(40, 50, dtype=torch.float64)
x = torch.randn(30, 40, dtype=torch.float64)
t0 = time.perf_counter()
pipeline.jacobian(lambda t: torch.tanh(t @ w), x, sparsity=None)
t1 = time.perf_counter()
pipeline.jacobian(lambda t: torch.tanh(t @ w), x, sparsity=None)
t2 = time.perf_counter()
print(json.dumps({{"first": t1 - t0, "second": t2 - t1, "scipy": "scipy.sparse" in sys.modules}}))
"""


def front_first(root: Path, threads: int) -> dict[str, Any]:
    """The first and second ``pipeline.jacobian`` of a small dense map in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", _FRONT.format(threads=threads)],
                         capture_output=True, text=True, check=True, cwd=root, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_detection(root: Path, N: int) -> tuple[float, float]:
    """``benchmarks.peers.first_detection`` for the checkout at ``root``."""
    code = ("import sys\nfrom benchmarks.peers import first_detection\n"
            f"print(*first_detection({N}))\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root, env=env)
    seconds_, calls = out.stdout.strip().splitlines()[-1].split()
    return float(seconds_), float(calls)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, default=None, help="a checkout to compare with")
    p.add_argument("--peer-python", default=None, help="interpreter with asdex and jax")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rounds = args.repeats or (3 if args.quick else 5)
    cases = QUICK if args.quick else CASES
    python = peer_python(args.peer_python)
    sides = {"jacpipe": HERE.parent} | ({"baseline": args.baseline} if args.baseline else {})
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    detections: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    fronts: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for job, size in cases:
            name = case_name(job, "jacobian", size)
            for side, root in sides.items():
                runs.setdefault((name, side), []).append(jacpipe_first(root, job, size,
                                                                       args.threads))
            if python is not None:
                runs.setdefault((name, "asdex"), []).append(asdex_first(python, job, size))
        for side, root in sides.items():
            detections[side].append((first_detection(root, 100)[0],
                                     first_detection(root, 1000)[1]))
            fronts.setdefault(side, []).append(front_first(root, args.threads))
    report = Report("firstcall", args.quick)
    _tables(report, cases, sides, runs, detections)
    report.table("pipeline.jacobian of (30, 40) -> (30, 50) tanh(x @ W) in a fresh process "
                 "(s, medians)", ["side", "first call", "second call", "SciPy imported"],
                 [[side, f"{_med(f, 'first'):.3f}", f"{_med(f, 'second'):.4f}",
                   any(x["scipy"] for x in f)] for side, f in fronts.items()])
    report.facts.update(threads=args.threads, rounds=rounds,
                        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY"),
                        load=os.getloadavg(), raw={f"{k[0]} / {k[1]}": v for k, v in runs.items()})
    report.finish(args.json)


def _med(xs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(x[key] for x in xs)


def _tables(report: Report, cases: list[tuple[str, int]], sides: dict[str, Path],
            runs: dict[tuple[str, str], list[dict[str, Any]]],
            detections: dict[str, list[tuple[float, float]]]) -> None:
    rows = []
    for job, size in cases:
        name = case_name(job, "jacobian", size)
        peer = runs.get((name, "asdex"))
        for side in sides:
            r = runs[(name, side)]
            first = _med(r, "first")
            ratio = first / _med(peer, "first") if peer else float("nan")
            rows.append([name, side, f"{_med(r, 'detection'):.3f}", f"{_med(r, 'coloring'):.3f}",
                         f"{_med(r, 'evaluation'):.3f}", f"{first:.3f}",
                         f"{_med(peer, 'first'):.3f}" if peer else "-", f"{ratio:.2f}x",
                         r[0]["colors"], any(x["sympy"] for x in r)])
            if peer and side == "jacpipe":
                report.target(Target(f"{name}: first Jacobian jacpipe / asdex", ratio, 1.0,
                                     higher_is_better=False))
    report.table("first Jacobian in a fresh process (s, medians)",
                 ["case", "side", "detection", "colouring", "evaluation", "first",
                  "asdex first", "ratio", "colours", "sympy imported"], rows)
    drows = []
    for side, ds in detections.items():
        seconds_ = statistics.median(d[0] for d in ds)
        calls = statistics.median(d[1] for d in ds)
        drows.append([side, f"{seconds_:.3f}", f"{calls:.1f}"])
        if side == "jacpipe":
            report.target(Target("first detection in a fresh process, heat n=10^4 (s)",
                                 seconds_, 0.2, higher_is_better=False, unit=" s"))
            report.target(Target("first detection in a fresh process, heat N=1000 (calls of fn)",
                                 calls, 30, higher_is_better=False, unit=""))
    report.table("first detection in a fresh process (medians)",
                 ["side", "heat N=100 s", "heat N=1000 in fn calls"], drows)


if __name__ == "__main__":
    main()
