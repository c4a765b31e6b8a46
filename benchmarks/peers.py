"""jacpipe against its closest peer, JAX's asdex, side by side in one run; and against jacrev.

(1) Sparse Jacobians (heat residual, periodic Brusselator) and sparse Hessians
    of CUTEst-style objectives (Rosenbrock, ARWHEAD, BROYDN3D), float64 on
    the CPU, the same maths written in torch (here) and in JAX
    (``benchmarks/peers_asdex.py``): detection seconds, colours, the first
    Jacobian (detection + colouring + one evaluation; asdex also compiles
    with ``jax.jit`` there, jacpipe evaluates eagerly) and the repeated
    evaluation (median): jacpipe eager (``compile="off"``) and compiled
    (``compile="on"``, its one-time compile seconds shown), asdex jitted.
    asdex runs in its own interpreter (``--peer-python``, default
    ``$JACPIPE_PEER_PYTHON`` or ``/tmp/peers-venv/bin/python``; install with
    ``pip install -e '.[peers]'`` into a separate venv); without it that
    half is skipped with one line. For each case, asdex's process sets
    its case up first, then serves one timed evaluation at a time: its
    evaluations join jacpipe's interleaved, shuffled rounds, so a ratio
    compares the two at the same moments of a shared machine whose speed
    drifts 2x within minutes (timed in separate runs, asdex's own time for
    one case moved 2-5x).
(2) Dense ``jacobian_rows`` against ``torch.func.jacrev`` from a
    ``(30, 40) -> (30, 50)`` map to mlp 2000, timed interleaved.

Also measured: the process's first sparsity detection (the first-call tax).
Writes ``benchmarks/results/peers.json``.

Each jacpipe case runs in a fresh interpreter, as each asdex case does, so
every first Jacobian pays its process's first-call costs (imports, numba,
torch's lazily loaded pieces). jacpipe checks its rows (NOTE: [Checks on
every engine call]: one extra reverse pass, on every call of a repeated
sparse evaluation too; "spaced" is ``checking(every_call=False)``: its first
call and then within 10% of its time, NOTE: [Spaced checks of repeated
evaluations]);
asdex and jacrev check nothing, so the repeated evaluations and the dense
calls are also timed with the checks off (``checks.checking(check_forward=False,
check_vmap=False)``). ``OMP_WAIT_POLICY`` is ``PASSIVE`` unless set: with
the default (spinning) policy, 2 OpenMP threads on a loaded 2-core machine
wait for each other's descheduled thread at every parallel region (heat
n = 10^4, eager: 174-296 ms against 7.6 ms passive, load 5).

    python -m benchmarks.peers             # up to 10^6 unknowns; ~10 minutes on 2 cores
    python -m benchmarks.peers --quick     # small sizes; ~2 minutes
    python -m benchmarks.peers --dense-only --repeats 31   # the jacrev table alone
"""

from __future__ import annotations

import json
import os

# Before torch is imported anywhere in this process (libgomp reads it once).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.harness import Report, Target, interleaved, median, parser  # noqa: E402


def seconds(x: float) -> str:
    """Seconds for the tables, with sub-millisecond times kept readable."""
    return f"{x * 1000:.2f} ms" if x < 0.1 else f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "peers_asdex.py"
DEFAULT_PEER = "/tmp/peers-venv/bin/python"

FULL = [("heat", "jacobian", 32), ("heat", "jacobian", 100), ("heat", "jacobian", 300),
        ("heat", "jacobian", 1000), ("brusselator", "jacobian", 32),
        ("brusselator", "jacobian", 256), ("rosenbrock", "hessian", 1000),
        ("rosenbrock", "hessian", 100_000), ("arwhead", "hessian", 1000),
        ("arwhead", "hessian", 100_000), ("broydn3d", "hessian", 100_000)]
QUICK = [("heat", "jacobian", 32), ("heat", "jacobian", 100), ("brusselator", "jacobian", 32),
         ("rosenbrock", "hessian", 1000), ("arwhead", "hessian", 100_000),
         ("broydn3d", "hessian", 1000)]


# ---------------------------------------------------------------------------
# The functions (torch; peers_asdex.py has their JAX twins)
# ---------------------------------------------------------------------------


def torch_case(job: str, size: int) -> tuple[Callable[[Any], Any], Any]:
    """``(fn, x)`` for a case: the same maths and point as the JAX twin."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    def heat(u: torch.Tensor) -> torch.Tensor:
        h = 1.0 / (size + 1)
        g = u + 0.5 * u**3 / 3
        p = F.pad(g.unsqueeze(0), (1, 1, 1, 1)).squeeze(0)
        lap = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * g) / h**2
        return u - 1e-4 * lap

    def lap(u: torch.Tensor) -> torch.Tensor:
        near = u.roll(1, 0) + u.roll(-1, 0) + u.roll(1, 1) + u.roll(-1, 1)
        return (near - 4 * u) * size**2

    def brusselator(x: torch.Tensor) -> torch.Tensor:
        N = size
        u, v = x[: N * N].reshape(N, N), x[N * N:].reshape(N, N)
        du = 1 + u**2 * v - 4.4 * u + 10.0 * lap(u)
        dv = 3.4 * u - u**2 * v + 10.0 * lap(v)
        return torch.cat([du.reshape(-1), dv.reshape(-1)])

    def broydn3d(x: torch.Tensor) -> torch.Tensor:
        p = F.pad(x, (1, 1))
        return (((3 - 2 * x) * x - p[:-2] - 2 * p[2:] + 1) ** 2).sum()

    table = {
        "heat": (heat, (size, size)),
        "brusselator": (brusselator, (2 * size * size,)),
        "rosenbrock": (lambda x: (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum(),
                       (size,)),
        "arwhead": (lambda x: (-4 * x[:-1] + 3).sum() + ((x[:-1] ** 2 + x[-1] ** 2) ** 2).sum(),
                    (size,)),
        "broydn3d": (broydn3d, (size,)),
    }
    fn, shape = table[job]
    x = torch.as_tensor(0.5 + 0.1 * np.random.default_rng(0).standard_normal(shape))
    return fn, x


def case_name(job: str, kind: str, size: int) -> str:
    n = 2 * size * size if job == "brusselator" else size * size if job == "heat" else size
    return f"{job} {'N' if job in ('heat', 'brusselator') else 'n'}={size:,} (n={n:,})"


# ---------------------------------------------------------------------------
# (1) sparse: jacpipe here, asdex in its interpreter
# ---------------------------------------------------------------------------


def jacpipe_sparse(job: str, kind: str, size: int, repeats: int, threads: int,
                   peer: str | None = None) -> dict[str, Any]:
    """:func:`jacpipe_case` in a fresh interpreter (first-call costs included, as asdex's).

    ``peer``: the interpreter with asdex; its evaluations are timed interleaved
    with jacpipe's, from a server process (``peers_asdex.py --serve``), under
    ``"peer"`` in the result.
    """
    code = ("import json, sys, torch\n"
            f"torch.set_num_threads({threads})\n"
            "from benchmarks.peers import jacpipe_case\n"
            f"print(json.dumps(jacpipe_case({job!r}, {kind!r}, {size}, {repeats}, "
            f"peer={peer!r}, threads={threads})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=HERE.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


class PeerServer:
    """asdex's side of one case in its interpreter: set up once, then one timed call per ask."""

    def __init__(self, python: str, job: str, kind: str, size: int, threads: int) -> None:
        case = {"name": case_name(job, kind, size), "job": job, "kind": kind, "size": size}
        self.process = subprocess.Popen(
            [python, str(PEER_SCRIPT), "--serve", json.dumps(case)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=peer_env(threads))
        assert self.process.stdout is not None and self.process.stdin is not None
        first = json.loads(self.process.stdout.readline())  # after asdex's first Jacobian
        self.versions = {"jax": first["jax"], "asdex": first["asdex"]}
        self.result: dict[str, Any] = first["result"]
        self.times: list[float] = []

    @property
    def failed(self) -> bool:
        return "error" in self.result

    def time(self) -> None:
        """One jitted evaluation, timed in the peer's process (no pipe in the timing)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("time\n")
        self.process.stdin.flush()
        self.times.append(float(self.process.stdout.readline()))

    def close(self) -> dict[str, Any]:
        """The case's facts, with the median evaluation under ``repeated``."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        if self.times:
            self.result["repeated"] = median(self.times)
        return {**self.result, **self.versions}


def peer_env(threads: int) -> dict[str, str]:
    """asdex's environment: with one thread, XLA's Eigen pool is off too."""
    env = dict(os.environ)
    if threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                            "intra_op_parallelism_threads=1").strip()
    return env


def jacpipe_case(job: str, kind: str, size: int, repeats: int, *, peer: str | None = None,
                 threads: int = 2) -> dict[str, Any]:
    """Detection, colours, first Jacobian, repeated eager and compiled evaluation.

    With ``peer`` (asdex's interpreter), asdex's case is set up first (so
    neither side's first call meets the other's), then its evaluations join
    the interleaved, shuffled rounds.
    """
    from pipeline.maths import checks
    from pipeline.sparse.coloring import choose_coloring
    from pipeline.sparse.compressed import sparse_hessian_rows, sparse_jacobian_rows
    from pipeline.sparse.detect import trace_sparsity

    server = PeerServer(peer, job, kind, size, threads) if peer else None
    fn, x = torch_case(job, size)
    rows = sparse_hessian_rows if kind == "hessian" else sparse_jacobian_rows
    began = time.perf_counter()
    pattern = trace_sparsity(fn, x, kind=kind, max_density=None).pattern
    detected = time.perf_counter()
    coloring = choose_coloring(pattern, symmetric=kind == "hessian")
    m = pattern.shape[0]
    rows(fn, x, 0, m, pattern, coloring, compile="off")
    first = time.perf_counter() - began
    t0 = time.perf_counter()
    rows(fn, x, 0, m, pattern, coloring, compile="on")
    compile_seconds = time.perf_counter() - t0
    def unchecked() -> Any:
        with checks.checking(check_forward=False, check_vmap=False):
            return rows(fn, x, 0, m, pattern, coloring, compile="on")

    def spaced() -> Any:
        with checks.checking(every_call=False):
            return rows(fn, x, 0, m, pattern, coloring, compile="on")

    methods = {
        "eager": lambda: rows(fn, x, 0, m, pattern, coloring, compile="off"),
        "compiled": lambda: rows(fn, x, 0, m, pattern, coloring, compile="on"),
        "spaced": spaced,
        "unchecked": unchecked,
        "pass": compiled_pass(fn, x, "hvp" if kind == "hessian" else coloring.mode),
    }
    # Settling, timed as part of compiling once: each compiled pass tries its two
    # inductor forms and checked calls try the check fused and apart (NOTE: [two
    # codegens per pass], NOTE: [the check fused into the pass]); the repeated
    # evaluations below are the kept forms'.
    t0 = time.perf_counter()
    for _ in range(SETTLE_CALLS):
        for name in ("compiled", "unchecked", "spaced", "pass"):
            methods[name]()
    compile_seconds += time.perf_counter() - t0
    if server is not None and not server.failed:
        methods["asdex"] = server.time
    times = interleaved(methods, repeats=repeats, warmup=0,
                        shuffle=True)  # shuffled: no call always follows eager's
    # Back to back as well (a loop with nothing between its calls: caches stay warm,
    # which favours the side whose working set fits them): BACK_TO_BACK calls each.
    row = {}
    for name in ("compiled", "unchecked", "asdex"):
        if name in methods:
            ts = []
            for _ in range(BACK_TO_BACK):
                t0 = time.perf_counter()
                methods[name]()
                ts.append(time.perf_counter() - t0)
            row[name] = median(ts)
    if "asdex" in row and server is not None:  # its own timings (no pipe), kept apart
        row["asdex"] = median(server.times[-BACK_TO_BACK:])
        del server.times[-BACK_TO_BACK:]
    return {"detection": detected - began, "colors": coloring.num_colors, "first": first,
            "eager": median(times["eager"]), "compiled": median(times["compiled"]),
            "unchecked": median(times["unchecked"]), "compile": compile_seconds,
            "pass": median(times["pass"]), "spaced": median(times["spaced"]),
            "back to back": row,
            "peer": server.close() if server is not None else None}


#: Calls of each compiled method before timing: enough for every trial to end.
SETTLE_CALLS = 30
#: Calls of each method in a row for the back-to-back medians.
BACK_TO_BACK = 21


def compiled_pass(fn: Callable[[Any], Any], x: Any, mode: str) -> Callable[[], Any]:
    """The compiled AD pass alone with its entries' read, on the kept seeds and reads of the
    last plan (NOTE: [entries read inside the compiled pass]; no check), the one an
    unchecked call runs.

    The repeated evaluation's parts: ``pass``; the rest of a call (plan, Python) =
    ``unchecked - pass``; the check = ``compiled - unchecked`` (compiled: every call
    checked).
    """
    from pipeline.maths.compiled import run_pass
    from pipeline.sparse import compressed

    plan = next(reversed(compressed._PLANS.values()))[2]
    seeds, reads = plan.tensors[(x.dtype, x.device)]
    xf = x.detach().reshape(-1)
    key = compressed._key(mode, x, plan, None)  # one chunk: the entries' pass
    # the pass alone (a checked call may run it fused)
    return lambda: run_pass(fn, key, lambda: compressed._gathered(passes(fn, x, mode)[0]), xf,
                            seeds, reads, compile="on")


def passes(fn: Callable[[Any], Any], x: Any, mode: str) -> tuple[Callable, Callable]:
    """A case's compressed pass as the engine builds it (``mode``: ``"hvp"``, ``"fwd"`` or
    ``"rev"``) and its check's reverse pass."""
    from pipeline.maths.engine import strict_outputs
    from pipeline.sparse import compressed

    strict = strict_outputs(fn)
    if mode == "hvp":
        def scalar(t: Any) -> Any:
            return strict(t.reshape(x.shape)).reshape(())

        return compressed._hvps(scalar), compressed._hvp_one(scalar)
    check = compressed._vjp_one(compressed._flat(strict, x.shape))
    if mode == "fwd":
        return compressed._jvps(strict, x.shape), check
    return compressed._vjps(strict, x.shape), check


def peer_python(asked: str | None) -> str | None:
    """The interpreter with asdex, or None (then asdex is skipped)."""
    path = asked or os.environ.get("JACPIPE_PEER_PYTHON") or DEFAULT_PEER
    if not Path(path).exists():
        return None
    probe = subprocess.run([path, "-c", "import asdex, jax"], capture_output=True)
    return path if probe.returncode == 0 else None


def sparse_table(report: Report, cases: list[tuple[str, str, int]], repeats: int,
                 python: str | None, threads: int) -> None:
    if python is None:
        print("asdex: skipped (no interpreter with asdex and jax: pip install -e '.[peers]' "
              "into a separate venv and pass --peer-python)")
    ours: dict[str, Any] = {}
    peer: dict[str, Any] = {}
    for case in cases:  # case by case, so both sides meet the same machine load
        name = case_name(*case)
        report.facts[f"load average before {name}"] = list(os.getloadavg())
        ours[name] = jacpipe_sparse(*case, repeats, threads, peer=python)
        answer = ours[name].pop("peer")
        print(f"jacpipe {name}: {ours[name]}", flush=True)
        if answer is not None:
            report.facts["peer versions"] = {"jax": answer.pop("jax"),
                                             "asdex": answer.pop("asdex")}
            peer[name] = answer
            print(f"asdex {name}: {peer[name]}", flush=True)
            if "error" in peer[name]:
                report.facts[f"asdex failed: {name}"] = peer.pop(name)["error"]
    rows = []
    for name, r in ours.items():
        p = peer.get(name)
        best = min(r["eager"], r["compiled"])
        failed = report.facts.get(f"asdex failed: {name}")

        rows.append([name, _pair(r["detection"], p, "detection"),
                     f"{r['colors']} / {p['colors']}" if p else str(r["colors"]),
                     _pair(r["first"], p, "first"), f"{seconds(r['eager'])}",
                     f"{seconds(r['compiled'])} (+{seconds(r['compile'])})",
                     seconds(r["spaced"]), seconds(r["unchecked"]),
                     f"{seconds(r['pass'])} / {seconds(r['unchecked'] - r['pass'])} / "
                     f"{seconds(r['compiled'] - r['unchecked'])}",
                     seconds(p["repeated"]) if p else "failed" if failed else "-",
                     f"{best / p['repeated']:.2f}x" if p else "-",
                     f"{r['spaced'] / p['repeated']:.2f}x" if p else "-",
                     f"{r['unchecked'] / p['repeated']:.2f}x" if p else "-"])
        if p:
            report.facts[name] = {"jacpipe": r, "asdex": p}
            report.target(Target(f"{name}: repeated evaluation jacpipe (best, checked) / asdex",
                                 best / p["repeated"], 1.0, higher_is_better=False))
            report.target(Target(f"{name}: repeated evaluation jacpipe (compiled, unchecked) "
                                 "/ asdex", r["unchecked"] / p["repeated"], 1.0,
                                 higher_is_better=False))
            report.target(Target(f"{name}: first Jacobian jacpipe / asdex",
                                 r["first"] / p["first"], 1.0, higher_is_better=False))
        else:
            report.facts[name] = {"jacpipe": r}
    report.table(f"sparse, float64, jacpipe / asdex, medians of {repeats}, {threads} thread(s)",
                 ["case", "detection", "colours", "first Jacobian", "jacpipe eager",
                  "jacpipe compiled, every call checked (+compile and trials once)",
                  "compiled, spaced checks",
                  "compiled, unchecked",
                  "parts: pass and its entries / rest of the call / check", "asdex jit",
                  "best checked / asdex", "spaced / asdex", "unchecked / asdex"], rows)
    _back_to_back_table(report, ours, peer, threads)


def _back_to_back_table(report: Report, ours: dict[str, Any], peer: dict[str, Any],
                        threads: int) -> None:
    """The repeated evaluations again, each side's calls in a row (warm caches)."""
    rows = []
    for name, r in ours.items():
        row = r.get("back to back") or {}
        if "asdex" not in row:
            continue
        checked, unchecked, theirs = row["compiled"], row["unchecked"], row["asdex"]
        rows.append([name, seconds(checked), seconds(unchecked), seconds(theirs),
                     f"{checked / theirs:.2f}x", f"{unchecked / theirs:.2f}x"])
        report.target(Target(f"{name}: back to back, jacpipe (compiled, checked) / asdex",
                             checked / theirs, 1.0, higher_is_better=False))
        report.target(Target(f"{name}: back to back, jacpipe (compiled, unchecked) / asdex",
                             unchecked / theirs, 1.0, higher_is_better=False))
    if rows:
        report.table(f"sparse repeated evaluation back to back ({BACK_TO_BACK} calls in a row "
                     f"each, medians, {threads} thread(s))",
                     ["case", "jacpipe compiled, every call checked", "compiled, unchecked",
                      "asdex jit", "checked / asdex", "unchecked / asdex"], rows)


def _pair(ours: float, peer: dict[str, Any] | None, key: str) -> str:
    return f"{seconds(ours)} / {seconds(peer[key])}" if peer else seconds(ours)


# ---------------------------------------------------------------------------
# (2) dense: jacobian_rows against torch.func.jacrev
# ---------------------------------------------------------------------------


def dense_table(report: Report, quick: bool, repeats: int) -> None:
    import torch

    from jobs import mlp
    from pipeline.maths import checks
    from pipeline.maths.engine import jacobian_rows

    def unchecked(fn: Callable[[Any], Any], x: Any, m: int) -> Any:
        with checks.checking(check_forward=False, check_vmap=False):
            return jacobian_rows(fn, x, 0, m)

    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 50, generator=g)
    cases: list[tuple[str, Callable[[Any], Any], Any]] = [
        ("(30, 40) -> (30, 50) tanh(x @ W)", lambda t: torch.tanh(t @ w),
         torch.randn(30, 40, generator=g))]
    for n in (200,) if quick else (200, 1000, 2000):
        p = mlp.build(n=n, m=n)
        cases.append((f"mlp {n}", p.fn, p.x))
    rows = []
    for name, fn, x in cases:
        m = fn(x).numel()
        times = interleaved({"jacrev": lambda fn=fn, x=x: torch.func.jacrev(fn)(x),
                             "engine": lambda fn=fn, x=x, m=m: jacobian_rows(fn, x, 0, m),
                             "unchecked": lambda fn=fn, x=x, m=m: unchecked(fn, x, m)},
                            repeats=max(repeats, 9 if quick else 15), warmup=2, shuffle=True)
        ratio = median(times["jacrev"]) / median(times["engine"])
        bare = median(times["jacrev"]) / median(times["unchecked"])
        rows.append([name, seconds(median(times["jacrev"])), seconds(median(times["engine"])),
                     seconds(median(times["unchecked"])), f"{ratio:.2f}x", f"{bare:.2f}x"])
        report.target(Target(f"dense {name}: jacrev / jacobian_rows (checked)", ratio, 1.0))
        report.target(Target(f"dense {name}: jacrev / jacobian_rows (unchecked)", bare, 1.0))
    report.table("dense jacobian_rows vs torch.func.jacrev (float32, interleaved, shuffled)",
                 ["case", "jacrev", "jacobian_rows", "unchecked", "jacrev / engine",
                  "jacrev / unchecked"], rows)


def first_detection(N: int) -> tuple[float, float]:
    """The first sparsity detection in a fresh process (heat N x N): seconds, and in fn calls."""
    code = ("import statistics, time, torch\ntorch.set_num_threads(2)\n"
            "from benchmarks.peers import torch_case\n"
            "from pipeline.sparse.detect import trace_sparsity\n"
            f"fn, x = torch_case('heat', {N})\nt = time.perf_counter()\n"
            "trace_sparsity(fn, x)\nd = time.perf_counter() - t\nts = []\n"
            "for _ in range(7):\n    t = time.perf_counter()\n    fn(x)\n"
            "    ts.append(time.perf_counter() - t)\n"
            "print(d, d / statistics.median(ts))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=HERE.parent)
    seconds_, calls = out.stdout.strip().splitlines()[-1].split()
    return float(seconds_), float(calls)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--peer-python", default=None, help="interpreter with asdex and jax")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--no-dense", action="store_true", help="skip the jacrev comparison")
    p.add_argument("--dense-only", action="store_true",
                   help="only the jacrev comparison (benchmarks/results/peers-dense.json)")
    p.add_argument("--cases", default=None,
                   help="only the sparse cases whose names contain one of these "
                        "';'-separated strings (e.g. 'N=256;rosenbrock n=100,000'); "
                        "skips the first-detection measurement and the dense table")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 9)
    report = Report("peers-dense" if args.dense_only else "peers", args.quick)
    report.facts["threads"] = args.threads
    report.facts["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    if args.dense_only:
        dense_table(report, args.quick, repeats)
        report.finish(args.json)
        return
    cases = QUICK if args.quick else FULL
    if args.cases:
        words = args.cases.split(";")
        cases = [c for c in cases if any(w in case_name(*c) for w in words)]
        sparse_table(report, cases, repeats, peer_python(args.peer_python), args.threads)
        report.finish(args.json)
        return
    small = [first_detection(100)[0] for _ in range(3)]
    large = [first_detection(1000)[1] for _ in range(1 if args.quick else 3)]
    report.facts["first detection in a fresh process, heat N=100 (s)"] = small
    report.facts["first detection in a fresh process, heat N=1000 (fn calls)"] = large
    report.target(Target("first detection in a fresh process, heat n=10^4 (s)",
                         statistics.median(small), 0.2, higher_is_better=False, unit=" s"))
    report.target(Target("first detection in a fresh process, heat N=1000 (calls of fn)",
                         statistics.median(large), 30, higher_is_better=False, unit=""))
    sparse_table(report, cases, repeats, peer_python(args.peer_python), args.threads)
    if not args.no_dense:
        dense_table(report, args.quick, repeats)
    report.finish(args.json)


if __name__ == "__main__":
    main()
