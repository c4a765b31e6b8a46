"""The parts of ``make run``'s start-up, each with and without jacpipe's cut, fresh processes.

Interleaved rounds, each case in a new interpreter (imports included):

* an embedded Ray: ``ray.init(num_cpus=2, include_dashboard=False)`` as Ray
  starts it vs :func:`pipeline.runner.cluster.start_embedded` (no autoscaler
  monitor, no dashboard process: NOTE: [A lean embedded Ray]); the seconds of
  ``ray.init`` and of the shutdown;
* ``check_job`` of ``make run``'s job (mlp 2000 x 2000) without and with
  the stand-in for torch's ``symbolic_shapes`` (NOTE: [backward without
  sympy]): without it, its first backward imports sympy;
* seconds from the command's start to Ray's start (``import ray`` then
  ``ray.init``): the job's parameters read from its source vs imported
  (NOTE: [Parameters without imports]).

    python -m benchmarks.startup              # 3 rounds
    python -m benchmarks.startup --quick      # 1 round
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import Report, median, parser

ROOT = Path(__file__).resolve().parents[1]

_RAY = """
import json, sys, time
t0 = time.perf_counter()
import ray
lean = sys.argv[1] == "lean"
if lean:
    from pipeline.runner.cluster import shutdown, start_embedded
t1 = time.perf_counter()
if lean:
    start_embedded(2)
else:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
t2 = time.perf_counter()
processes = sorted(ray._private.worker._global_node.all_processes)
shutdown() if lean else ray.shutdown()
t3 = time.perf_counter()
print(json.dumps({"init": t2 - t1, "shutdown": t3 - t2, "processes": processes}))
"""

_CHECK = """
import json, sys, time
import torch
if sys.argv[1] == "sympy":  # no stand-in: torch imports it on the first backward, as before
    import pipeline.core.imports
    pipeline.core.imports.spare_sympy_import = lambda: False
from pipeline.core.options import RunOptions
from pipeline.runner.job import check_job
t0 = time.perf_counter()
check_job(RunOptions(job="mlp", params=["n=2000", "m=2000"], shards=8, executor="ray"))
print(json.dumps({"check": time.perf_counter() - t0, "sympy": "sympy" in sys.modules}))
"""

_PARAMS = """
import json, sys, time
t0 = time.perf_counter()
from pipeline.problem.problem import (job_parameters, parse_params, resolve_builder,
                                      static_parameters)
known = static_parameters("mlp") if sys.argv[1] == "source" else None
if known is None:
    known = job_parameters(resolve_builder("mlp"))
parse_params(known, ["n=2000", "m=2000"])
print(json.dumps({"before_ray": time.perf_counter() - t0, "torch": "torch" in sys.modules}))
"""


def _fresh(code: str, arg: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    done = subprocess.run([sys.executable, "-c", code, arg], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{arg}: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Time the three parts, print their tables, write ``benchmarks/results/startup.json``."""
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    repeats = max(1, args.repeats or (1 if args.quick else 3))
    cases = {"ray": (_RAY, ("ray", "lean")), "check": (_CHECK, ("sympy", "stand-in")),
             "params": (_PARAMS, ("import", "source"))}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {arg: [] for arg in pair} for name, (_, pair) in cases.items()}
    for _ in range(repeats):
        for name, (code, pair) in cases.items():
            for arg in pair:
                runs[name][arg].append(_fresh(code, arg))
    report = Report("startup", quick=args.quick)

    def med(name: str, arg: str, key: str) -> float:
        return median([r[key] for r in runs[name][arg]])

    rows = []
    for label, name, a, b, key in (
            ("ray.init", "ray", "ray", "lean", "init"),
            ("shutdown", "ray", "ray", "lean", "shutdown"),
            ("check_job, mlp 2000 x 2000", "check", "sympy", "stand-in", "check"),
            ("command start to ray.init (parameters)", "params", "import", "source",
             "before_ray")):
        before, after = med(name, a, key), med(name, b, key)
        rows.append([label, f"{before:.2f} s", f"{after:.2f} s", f"{after / before:.2f}x"])
    report.table(f"fresh processes, median of {repeats}", ["part", "before", "now", "ratio"],
                 rows)
    report.facts = {"runs": runs, "load_average": os.getloadavg()}
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
