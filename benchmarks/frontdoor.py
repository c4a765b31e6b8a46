"""The Python front door and the start-up a user sees, against the plainest scripts.

In this process (interleaved, medians):

* ``pipeline.jacobian(fn, x)`` on a 100 x 100 closure vs ``torch.func.jacrev(fn)(x)``;
* a Newton loop of 10 ``pipeline.jacobian(..., executor="ray")`` calls on a
  2000 x 2000 problem: iterations 2-10 (the embedded Ray kept between calls)
  vs the same call in this process (``executor="local"``, the engine alone).

Fresh processes (interpreter start and imports included), interleaved rounds:

* ``jacpipe run robot_arm -p batch=200`` and a 6 x 6 job vs an in-process
  script (build the job, ``torch.func``, one ``pq.write_table``);
* ``make run``'s command (2000 x 2000 on Ray, 8 shards, ``--verify``, stderr
  not a terminal) vs a script that computes the same Jacobian with
  ``torch.func.jacrev``, writes it with pyarrow, reads it back and checks it
  against ``torch.autograd.functional.jacobian`` (what ``--verify`` does);
  and the longest stretch of ``make run`` without a line on stderr (its last
  round's stderr lines, timed, go to the JSON: where its seconds went).

    python -m benchmarks.frontdoor            # 3 rounds
    python -m benchmarks.frontdoor --closure-only   # the closure alone (frontdoor-closure.json)
    python -m benchmarks.frontdoor --dense-only     # the engine's dense rows vs jacrev, from
                                                    # (30, 40) -> (30, 50) to mlp 2000, as
                                                    # benchmarks.peers (frontdoor-dense.json)
    python -m benchmarks.frontdoor --quick    # 1 round, a 600 x 600 Newton loop
    git worktree add /tmp/before COMMIT && python -m benchmarks.frontdoor --before /tmp/before
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Report, Target, interleaved, median, parser, seconds

ROOT = Path(__file__).resolve().parents[1]

#: The in-process script of a job: build, torch.func, one Parquet file (and the check).
SCRIPT = """
import sys, importlib
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, torch
job, out, check = sys.argv[1], sys.argv[2], sys.argv[3] == "check"
params = dict(kv.split("=") for kv in sys.argv[4:])
p = importlib.import_module(f"jobs.{job}").build(**{k: int(v) for k, v in params.items()})
jac = torch.func.jacrev(p.fn)
J = (torch.func.vmap(jac)(p.x) if p.kind == "batched" else jac(p.x)).detach()
J = J.reshape(-1, p.x[0].numel() if p.kind == "batched" else p.x.numel()).numpy()
n = J.shape[1]
values = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(J).reshape(-1)), n)
pq.write_table(pa.table({"row": np.arange(len(J)), "values": values}), out, compression="zstd")
if check:
    back = np.stack(pq.read_table(out).column("values").to_numpy(zero_copy_only=False))
    ref = torch.autograd.functional.jacobian(p.fn, p.x).reshape(len(J), n).numpy()
    assert np.allclose(back, ref, rtol=1e-4, atol=1e-5)
"""

#: ``make run``'s command (Makefile), into a folder of ours.
MAKE_RUN = ["run", "mlp", "-p", "n=2000", "-p", "m=2000", "--shards", "8", "--executor", "ray",
            "--no-resume", "--verify"]


def _env(root: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE",
                        "JACPIPE_EXECUTOR")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env


def _call(args: list[str], root: Path = ROOT) -> None:
    proc = subprocess.run(args, cwd=root, env=_env(root), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-800:]}")


def _script(job: str, out: Path, *params: str, check: bool = False) -> None:
    _call([sys.executable, "-c", SCRIPT, job, str(out), "check" if check else "-", *params])


def _jacpipe(out: Path, *args: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    _call([sys.executable, "-m", "pipeline.cli", "run", *args, "--out", str(out),
           "--no-progress"])


def _silence(out: Path, gaps: list[float], where: list[str],
             timeline: list[list[Any]] | None = None) -> None:
    """Run ``make run``'s command with stderr a pipe; note its longest stretch without a line.

    ``timeline`` gets ``[seconds, line]`` for each stderr line of this run, and the exit.
    """
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *MAKE_RUN, "--out", str(out)],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stamps = [t0]
    tail: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stamps.append(time.perf_counter())
            tail.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait()
    reader.join()
    stamps.append(time.perf_counter())
    if proc.returncode != 0:
        raise RuntimeError(f"make run exited {proc.returncode}: {''.join(tail)[-800:]}")
    if timeline is not None:
        timeline[:] = [[round(t - t0, 2), line.strip()] for t, line in zip(stamps[1:], tail,
                                                                           strict=False)]
        timeline.append([round(stamps[-1] - t0, 2), "(exit)"])
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    gaps.append(max(steps))
    k = steps.index(max(steps))  # the line that ended the longest silence (or the exit)
    where.append(tail[k].strip() if k < len(tail) else "(exit)")


def _before(out: Path, checkout: Path) -> None:
    """``make run``'s command with the code of another checkout (``--before``)."""
    shutil.rmtree(out, ignore_errors=True)
    _call([sys.executable, "-m", "pipeline.cli", *MAKE_RUN, "--out", str(out)], checkout)


def _processes(root: Path, repeats: int, gaps: list[float], where: list[str],
               timeline: list[list[Any]], before: Path | None = None
               ) -> dict[str, list[float]]:
    cases = {
        "script robot_arm batch=200": lambda: _script("robot_arm", root / "s-arm.parquet",
                                                      "batch=200"),
        "jacpipe run robot_arm -p batch=200": lambda: _jacpipe(root / "arm", "robot_arm", "-p",
                                                               "batch=200"),
        "script mlp 6 x 6": lambda: _script("mlp", root / "s-6.parquet", "n=6", "m=6"),
        "jacpipe run mlp -p n=6 -p m=6": lambda: _jacpipe(root / "six", "mlp", "-p", "n=6",
                                                          "-p", "m=6"),
        "script 2000 x 2000 + check": lambda: _script("mlp", root / "s-2000.parquet", "n=2000",
                                                      "m=2000", check=True),
        "make run (--verify)": lambda: _silence(root / "make-run", gaps, where, timeline),
    }
    if before is not None:
        cases[BEFORE] = lambda: _before(root / "make-run-before", before)
    return interleaved(cases, repeats=repeats, warmup=0)


#: The case of ``--before DIR``: ``make run``'s command with that checkout's code.
BEFORE = "make run (--verify), code of --before"


def _closure(repeats: int) -> dict[str, list[float]]:
    import torch

    import pipeline

    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 100, generator=g, dtype=torch.float64) / 10
    x = torch.randn(100, generator=g, dtype=torch.float64)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w @ t)

    def spaced_checks() -> Any:
        from pipeline.maths import checks

        with checks.checking(every_call=False):  # every SPOT_EVERY-th remembered call
            return pipeline.jacobian(fn, x, executor="auto")

    return interleaved({
        "torch.func.jacrev": lambda: torch.func.jacrev(fn)(x),
        "pipeline.jacobian": lambda: pipeline.jacobian(fn, x, executor="auto"),
        SPACED: spaced_checks,
    }, repeats=repeats, warmup=3, shuffle=True)


#: The closure with spaced checks: the vmap spot check on every 8th repeated call only (the
#: default checks every call: NOTE: [Repeated calls of one function]).
SPACED = "pipeline.jacobian, checking(every_call=False)"


def _newton(n: int, iterations: int, local_repeats: int) -> dict[str, Any]:
    """Newton on ``tanh(W x) + x - b``: per-call seconds on Ray, and in this process."""
    import torch

    import pipeline

    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64)

    def residual(t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w @ t) + t - b

    pipeline.shutdown()  # a fresh embedded Ray: the first call pays its start-up
    x = torch.zeros(n, dtype=torch.float64)
    ray_s, norms = [], []
    for _ in range(iterations):
        t0 = time.perf_counter()
        J = pipeline.jacobian(residual, x, executor="ray", shards=2)
        ray_s.append(time.perf_counter() - t0)
        x = x - torch.linalg.solve(J, residual(x))
        norms.append(float(residual(x).norm()))
    local = interleaved({"local": lambda: pipeline.jacobian(residual, x, executor="local")},
                        repeats=local_repeats, warmup=1)["local"]
    pipeline.shutdown()
    return {"ray_s": ray_s, "local_s": local, "residual_norms": norms}


def _closure_table(report: Report, closure: dict[str, list[float]]) -> tuple[float, float]:
    jr, pj = median(closure["torch.func.jacrev"]), median(closure["pipeline.jacobian"])
    spaced = median(closure[SPACED])
    report.table("in this process: a 100 x 100 closure, ms (median)",
                 ["call", "median ms", "ratio"],
                 [["torch.func.jacrev(fn)(x)", f"{jr * 1e3:.3f}", "1"],
                  ["pipeline.jacobian(fn, x), every call spot-checked", f"{pj * 1e3:.3f}",
                   f"{pj / jr:.2f}x"],
                  ["the same, spot-checked on every 8th call (checking(every_call=False))",
                   f"{spaced * 1e3:.3f}", f"{spaced / jr:.2f}x"]])
    return jr, pj


def _closure_only(closure: dict[str, list[float]], args: Any) -> int:
    report = Report("frontdoor-closure", quick=args.quick)
    jr, pj = _closure_table(report, closure)
    report.target(Target("pipeline.jacobian 100 x 100 / torch.func.jacrev", pj / jr, 1.5,
                         higher_is_better=False))
    report.facts = {"closure_s": closure, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    report.finish(args.json)
    return 0


def _dense_only(args: Any) -> int:
    """``benchmarks.peers``' dense table alone (issue 27's small-call target), 2 threads."""
    import torch

    from benchmarks.peers import dense_table

    torch.set_num_threads(2)
    report = Report("frontdoor-dense", quick=args.quick)
    dense_table(report, args.quick, args.repeats or (3 if args.quick else 5))
    report.facts = {"threads": 2, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    report.finish(args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Time every case, print the tables, write ``benchmarks/results/frontdoor.json``."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, default=None,
                   help="another checkout (e.g. a git worktree of an older commit): its "
                        "make run command joins the interleaved rounds")
    p.add_argument("--closure-only", action="store_true",
                   help="only the 100 x 100 closure (benchmarks/results/frontdoor-closure.json)")
    p.add_argument("--dense-only", action="store_true",
                   help="only jacobian_rows vs jacrev (benchmarks/results/frontdoor-dense.json)")
    args = p.parse_args(argv)
    if args.dense_only:
        return _dense_only(args)
    repeats = max(1, args.repeats or (1 if args.quick else 3))
    closure = _closure(50 if args.quick else 300)
    if args.closure_only:
        return _closure_only(closure, args)
    report = Report("frontdoor", quick=args.quick)
    n = 600 if args.quick else 2000
    newton = _newton(n, 10, 3)
    root = Path(tempfile.mkdtemp(prefix="jacpipe-frontdoor-"))
    gaps: list[float] = []
    where: list[str] = []
    timeline: list[list[Any]] = []
    try:
        times = _processes(root, repeats, gaps, where, timeline, args.before)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    jr, pj = _closure_table(report, closure)
    later, local = median(newton["ray_s"][1:]), median(newton["local_s"])
    report.table(f"Newton loop, {n} x {n}, 10 calls of pipeline.jacobian on Ray",
                 ["", "seconds"],
                 [["iteration 1 (starts Ray)", seconds(newton["ray_s"][0])],
                  ["iterations 2-10, median", seconds(later)],
                  ["the same call in this process (executor=local), median", seconds(local)],
                  ["ratio", f"{later / local:.2f}x"]])
    base = {"jacpipe run robot_arm -p batch=200": "script robot_arm batch=200",
            "jacpipe run mlp -p n=6 -p m=6": "script mlp 6 x 6",
            "make run (--verify)": "script 2000 x 2000 + check",
            BEFORE: "script 2000 x 2000 + check"}
    rows = []
    for name, ts in times.items():
        ratio = f"{median(ts) / median(times[base[name]]):.2f}x" if name in base else "1"
        rows.append([name, seconds(median(ts)), ratio])
    report.table(f"fresh processes, wall seconds, median of {repeats}",
                 ["case", "median", "time / in-process script"], rows)
    report.table("make run: longest stretch without a line on stderr (not a terminal)",
                 ["median", "max"], [[seconds(median(gaps)), seconds(max(gaps))]])
    report.target(Target("pipeline.jacobian 100 x 100 / torch.func.jacrev", pj / jr, 1.5,
                         higher_is_better=False))
    report.target(Target(f"Newton iterations 2-10 on Ray / in process ({n} x {n})",
                         later / local, 1.3, higher_is_better=False))
    for name, goal in (("jacpipe run robot_arm -p batch=200", 1.5),
                       ("jacpipe run mlp -p n=6 -p m=6", 1.5), ("make run (--verify)", 2.0)):
        report.target(Target(f"{name} / in-process script",
                             median(times[name]) / median(times[base[name]]), goal,
                             higher_is_better=False))
    report.target(Target("make run: seconds without output", max(gaps), 10.0,
                         higher_is_better=False, unit=" s"))
    report.facts = {"closure_s": closure, "newton": newton, "times_s": times,
                    "silence_s": gaps, "silence_ended_by": where,
                    "make_run_last_timeline": timeline, "script": SCRIPT,
                    "make_run": MAKE_RUN}
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
