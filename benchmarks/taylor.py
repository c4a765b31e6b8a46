"""Taylor mode (pipeline.maths.taylor) against nested torch.func and jet-for-pytorch.

Float64, 2 torch threads, a tanh MLP ``D -> 768 -> 768 -> 512 -> 512 -> 1``:

(1) Laplacian at 256 points (D = 50): ``laplacian(f, batched=True)`` (one
    collapsed 2-jet through one trace of ``vmap(f)``) against nested
    torch.func (vmap over points of: vmap over the 50 basis vectors of
    ``jvp(grad(f))``, contracted and summed) and jet-for-pytorch's collapsed
    ``laplacian`` (vmapped over points) where importable. Time per point.
(2) Peak memory of (1) per point: each method runs once in a fresh
    subprocess; reported is the growth of the peak resident set size
    (``VmHWM``, reset right before the call) over the RSS right before the
    call (model, points, imports and trace already in place), divided by
    the points. RSS is what the OS
    gives the process; with ``MALLOC_MMAP_THRESHOLD_`` fixed, every big
    tensor is its own mapping, returned on free, so the peak RSS is the
    peak of live tensors (plus small change).
(3) Biharmonic, the same net with D = 5: one collapsed 4-jet over the D^2
    polarization directions against nested torch.func (Laplacian of the
    Laplacian: grad, jvp, grad, jvp), and jet-for-pytorch's ``bilaplacian``.
(4) Stochastic biharmonic (Gaussian directions, D = 5): time per sample
    against nested torch.func along the same directions (4 nested jvps).
(5) The 5th-order directional derivative along one direction per point:
    ``taylor(f, order=5, batched=True)`` against 5 nested jvps.
(6) Every benchmarked value agrees with nested torch.func (max relative error).
(7) Estimator coverage at D = 50, 64 samples: the share of points whose
    estimate lies within 3 standard errors of the exact value (Laplacian on
    the big net at the 256 points; biharmonic on a small tanh net at 200 points).

jet-for-pytorch declares Python >= 3.12 for one PEP 695 ``type`` alias; on
3.11 a copy patched to a plain class is put on ``sys.path`` from
``--jet-path`` (default ``/tmp/jetlib``; how to make it: the NOTE below),
and the JSON records whether it was importable. It is never a dependency of
the project.

    python -m benchmarks.taylor            # ~5 minutes on 2 cores
    python -m benchmarks.taylor --quick    # ~20 seconds, small sizes

NOTE: to make jet-for-pytorch importable on Python 3.11:
``pip download --no-deps --python-version 3.12 --only-binary=:all: jet-for-pytorch``,
unzip the wheel, replace ``type PyTree[Leaf] = (...)`` in ``jet/utils.py`` by
``class PyTree: __class_getitem__ = classmethod(lambda cls, item: Any)`` and
copy the ``jet`` folder to ``/tmp/jetlib`` (never into the project's environment).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.harness import Report, Target, interleaved, median, paired_speed, parser

F64 = torch.float64
FULL = {"widths": [768, 768, 512, 512], "points": 256, "bih_points": 32, "samples": 64,
        "repeats": 5}
QUICK = {"widths": [64, 64], "points": 16, "bih_points": 4, "samples": 16, "repeats": 3}


def make_net(d: int, widths: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [d, *widths, 1]
    params = [(torch.randn(a, b, generator=gen, dtype=F64) / a**0.5,
               torch.randn(b, generator=gen, dtype=F64) * 0.1)
              for a, b in zip(sizes[:-1], sizes[1:], strict=True)]

    def f(x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (w, b) in enumerate(params):
            h = torch.nn.functional.linear(h, w.T, b)
            if i < len(params) - 1:
                h = torch.tanh(h)
        return h.squeeze(-1)

    return f


def points(n: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- the nested torch.func references ------------------------------------------------


def nested_laplacian(f):
    def lap(x: torch.Tensor) -> torch.Tensor:
        g = torch.func.grad(f)
        eye = torch.eye(x.numel(), dtype=x.dtype)
        return torch.func.vmap(lambda e: torch.func.jvp(g, (x,), (e,))[1] @ e)(eye).sum()

    return lap


def nested_biharmonic(f):
    return nested_laplacian(nested_laplacian(f))


def nested_directional(f, order: int):
    def d(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = f
        for _ in range(order):
            g = (lambda h: lambda t: torch.func.jvp(h, (t,), (v,))[1])(g)
        return g(x)

    return d


def jet_module(path: str):
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        import jet

        return jet, "importable"
    except Exception as exc:  # absent, or an incompatible Python
        return None, f"not importable ({type(exc).__name__}: {exc})"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1.0))


# --- the measurements ----------------------------------------------------------------


def laplacian_rows(report: Report, sizes: dict, jet, errors: dict) -> torch.Tensor:
    from pipeline.maths.taylor import laplacian

    f = make_net(50, sizes["widths"])
    xs = points(sizes["points"], 50)
    methods = {"taylor (collapsed, batched)": lambda: laplacian(f, batched=True)(xs),
               "nested torch.func": lambda: torch.func.vmap(nested_laplacian(f))(xs)}
    if jet is not None:
        jl = torch.func.vmap(jet.laplacian(f, (xs[0],)))
        methods["jet-for-pytorch (collapsed)"] = lambda: jl(xs)
    ours = "taylor (collapsed, batched)"
    times, results = _timed_table(
        report, methods, sizes, errors, "laplacian", xs.shape[0],
        f"(1) Laplacian, tanh MLP 50 -> {sizes['widths']} -> 1, {xs.shape[0]} points")
    report.target(Target("Laplacian time per point: nested / taylor",
                         paired_speed(times, "nested torch.func", ours), 2.0))
    if jet is not None:
        report.target(Target("Laplacian time per point: jet-for-pytorch / taylor",
                             paired_speed(times, "jet-for-pytorch (collapsed)", ours), 1.0))
    report.facts["laplacian_seconds"] = {k: median(v) for k, v in times.items()}
    return results[ours]


def _timed_table(report: Report, methods: dict, sizes: dict, errors: dict, what: str,
                 points: int, title: str) -> tuple[dict, dict]:
    """Interleaved timings of ``methods``, their errors vs nested, and one table row each."""
    results: dict = {}
    times = interleaved(methods, repeats=sizes["repeats"],
                        after=lambda name, out: results.setdefault(name, out), shuffle=True)
    ref, ours = results["nested torch.func"], "taylor (collapsed, batched)"
    rows = []
    for name, ts in times.items():
        errors[f"{what}: {name}"] = rel_err(results[name], ref)
        rows.append([name, f"{median(ts) / points * 1e3:.3f} ms",
                     paired_speed(times, name, ours) if name != ours else 1.0,
                     errors[f"{what}: {name}"]])
    report.table(title, ["method", "median time per point", "taylor speed-up",
                         "rel. err vs nested"], rows)
    return times, results


def biharmonic_rows(report: Report, sizes: dict, jet, errors: dict) -> None:
    from pipeline.maths.taylor import biharmonic

    f = make_net(5, sizes["widths"])
    xs = points(sizes["bih_points"], 5)
    methods = {"taylor (collapsed, batched)": lambda: biharmonic(f, batched=True)(xs),
               "nested torch.func": lambda: torch.func.vmap(nested_biharmonic(f))(xs)}
    if jet is not None:
        jb = torch.func.vmap(jet.bilaplacian(f, (xs[0],)))
        methods["jet-for-pytorch (collapsed)"] = lambda: jb(xs)
    ours = "taylor (collapsed, batched)"
    times, _ = _timed_table(
        report, methods, sizes, errors, "biharmonic", xs.shape[0],
        f"(3) Biharmonic, tanh MLP 5 -> {sizes['widths']} -> 1, {xs.shape[0]} points")
    report.target(Target("biharmonic time per point: nested / taylor",
                         paired_speed(times, "nested torch.func", ours), 1.8))


def stochastic_rows(report: Report, sizes: dict, errors: dict) -> None:
    from pipeline.maths.taylor import biharmonic

    f = make_net(5, sizes["widths"])
    xs = points(sizes["bih_points"], 5)
    s = sizes["samples"]
    # the directions biharmonic(samples=s, seed=0, batched=True) draws
    v = torch.randn((s, *xs.shape), generator=torch.Generator().manual_seed(0), dtype=F64)
    d4 = nested_directional(f, 4)
    nested = torch.func.vmap(torch.func.vmap(d4), in_dims=(None, 0))
    methods = {"taylor": lambda: biharmonic(f, samples=s, seed=0, batched=True)(xs)[0],
               "nested torch.func": lambda: (nested(xs, v) / 3).mean(0)}
    results: dict = {}
    times = interleaved(methods, repeats=sizes["repeats"],
                        after=lambda name, out: results.setdefault(name, out), shuffle=True)
    errors["stochastic biharmonic"] = rel_err(results["taylor"], results["nested torch.func"])
    per = xs.shape[0] * s
    rows = [[name, f"{median(ts) / per * 1e6:.1f} us"] for name, ts in times.items()]
    report.table(f"(4) Stochastic biharmonic, D = 5, {s} Gaussian samples x {xs.shape[0]} "
                 "points", ["method", "median time per sample and point"], rows)
    report.target(Target("stochastic biharmonic time per sample: nested / taylor",
                         paired_speed(times, "nested torch.func", "taylor"), 5.0))


def directional_rows(report: Report, sizes: dict, errors: dict) -> None:
    from pipeline.maths.taylor import taylor

    f = make_net(50, sizes["widths"])
    xs = points(sizes["points"], 50)
    vs = points(sizes["points"], 50, seed=2)
    d5 = torch.func.vmap(nested_directional(f, 5))
    methods = {"taylor": lambda: taylor(f, order=5, batched=True)(xs, vs)[5],
               "nested torch.func": lambda: d5(xs, vs)}
    results: dict = {}
    times = interleaved(methods, repeats=sizes["repeats"],
                        after=lambda name, out: results.setdefault(name, out), shuffle=True)
    errors["5th directional derivative"] = rel_err(results["taylor"],
                                                   results["nested torch.func"])
    rows = [[name, f"{median(ts) / xs.shape[0] * 1e3:.3f} ms"] for name, ts in times.items()]
    report.table(f"(5) 5th-order directional derivative, {xs.shape[0]} points",
                 ["method", "median time per point"], rows)
    report.target(Target("5th directional derivative: nested / taylor",
                         paired_speed(times, "nested torch.func", "taylor"), 5.0))


def coverage_rows(report: Report, sizes: dict, exact_lap: torch.Tensor) -> None:
    from pipeline.maths.taylor import biharmonic, laplacian

    f = make_net(50, sizes["widths"])
    xs = points(sizes["points"], 50)
    est, err = laplacian(f, samples=64, seed=0, batched=True)(xs)
    lap_share = float(((est - exact_lap).abs() <= 3 * err).double().mean())
    small = make_net(50, [32, 32])
    ys = points(200, 50, seed=3)
    exact = biharmonic(small, batched=True)(ys)
    est, err = biharmonic(small, samples=64, seed=0, batched=True)(ys)
    bih_share = float(((est - exact).abs() <= 3 * err).double().mean())
    report.table("(7) estimator coverage, D = 50, 64 samples",
                 ["estimator", "points", "share within 3 stderr"],
                 [["Laplacian (Rademacher), big net", xs.shape[0], lap_share],
                  ["biharmonic (Gaussian), tanh 50 -> 32 -> 32 -> 1", 200, bih_share]])
    report.target(Target("Laplacian estimator: share within 3 stderr", lap_share, 0.99,
                         unit=""))
    report.target(Target("biharmonic estimator: share within 3 stderr", bih_share, 0.99,
                         unit="", note="Gaussian quartic forms are heavy-tailed"))


def memory_rows(report: Report, quick: bool, jet_path: str, jet_ok: bool) -> None:
    methods = ["taylor", "nested"] + (["jet"] if jet_ok else [])
    per_point = {}
    for m in methods:
        cmd = [sys.executable, "-m", "benchmarks.taylor", "--memory-child", m,
               "--jet-path", jet_path] + (["--quick"] if quick else [])
        # a fixed mmap threshold: glibc's dynamic one keeps freed big blocks in the heap at
        # random, which made the peak RSS of one method vary 3x from run to run
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env,
                             cwd=Path(__file__).resolve().parent.parent)
        per_point[m] = json.loads(out.stdout.strip().splitlines()[-1])["bytes_per_point"]
    rows = [[m, f"{b / 2**20:.2f} MiB", b / per_point["taylor"]] for m, b in per_point.items()]
    report.table("(2) Laplacian peak memory per point (growth of peak RSS, fresh process)",
                 ["method", "peak per point", "vs taylor"], rows)
    report.target(Target("Laplacian peak memory per point: taylor / nested",
                         per_point["taylor"] / per_point["nested"], 0.5,
                         higher_is_better=False))
    report.facts["memory_bytes_per_point"] = per_point


def memory_child(method: str, quick: bool, jet_path: str) -> None:
    """Run one Laplacian method once and print its peak RSS growth per point (JSON)."""
    import psutil

    from pipeline.maths.taylor import laplacian

    torch.set_num_threads(2)
    sizes = QUICK if quick else FULL
    f = make_net(50, sizes["widths"])
    xs = points(sizes["points"], 50)
    if method == "taylor":
        run = lambda: laplacian(f, batched=True)(xs)  # noqa: E731
        laplacian(f, batched=True)(xs[:1])  # trace outside the measurement
    elif method == "nested":
        run = lambda: torch.func.vmap(nested_laplacian(f))(xs)  # noqa: E731
    else:
        jet, _ = jet_module(jet_path)
        jl = torch.func.vmap(jet.laplacian(f, (xs[0],)))
        run = lambda: jl(xs)  # noqa: E731
        jl(xs[:1])
    base = psutil.Process().memory_info().rss
    # NOTE: ru_maxrss survives exec (a child starts at its parent's high-water mark), so the
    # peak is VmHWM of this process, reset right before the call (clear_refs 5, Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")
    run()
    peak = _vm_hwm()
    print(json.dumps({"bytes_per_point": (peak - base) / xs.shape[0]}))


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--jet-path", default="/tmp/jetlib")
    p.add_argument("--memory-child", default=None, help=argparse_suppress())
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.quick, args.jet_path)
        return
    torch.set_num_threads(2)
    sizes = dict(QUICK if args.quick else FULL)
    if args.repeats:
        sizes["repeats"] = args.repeats
    jet, jet_state = jet_module(args.jet_path)
    report = Report("taylor", quick=args.quick)
    report.facts["jet-for-pytorch"] = jet_state
    report.facts["sizes"] = sizes
    errors: dict = {}
    exact_lap = laplacian_rows(report, sizes, jet, errors)
    memory_rows(report, args.quick, args.jet_path, jet is not None)
    biharmonic_rows(report, sizes, jet, errors)
    stochastic_rows(report, sizes, errors)
    directional_rows(report, sizes, errors)
    coverage_rows(report, sizes, exact_lap)
    report.table("(6) agreement with nested torch.func", ["value", "max relative error"],
                 [[k, v] for k, v in errors.items()])
    worst = max(v for k, v in errors.items() if "jet-for-pytorch" not in k)
    report.target(Target("max relative error vs nested torch.func", worst, 1e-10,
                         higher_is_better=False, unit=""))
    report.finish(args.json)


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
