"""The adjoint check: its rounding on every built-in job, and its cost.

(1) False alarms: :func:`pipeline.maths.adjoint.adjoint_check` on every built-in
    job (small parameters, :data:`JOBS`) in float32 and float64, seeds
    ``0 .. SEEDS - 1``: the largest relative difference ``rel_error`` seen, in
    unit roundoffs, against the default tolerance; a false alarm is any
    ``agree=False``. Target: none.
(2) Cost: the check's wall time in units of one forward + backward pass
    (``torch.autograd.grad`` of ``u . fn(x)``; Hessians: one Hessian-vector
    product by reverse over reverse) of the same job, and against its floor, that pass plus
    one bare ``torch.func.jvp`` (the two products it compares), timed
    interleaved (harness), medians of ``--repeats``. Measured at the
    sizes of :data:`COST_JOBS` (the small sizes with ``--quick``), one
    torch thread.

    python -m benchmarks.adjoint            # ~1 minute
    python -m benchmarks.adjoint --quick    # a few seconds
"""

from __future__ import annotations

import torch

from benchmarks.harness import Report, Target, interleaved, median, parser

SEEDS = 8
#: Small parameters of every built-in job (the false-alarm sweep).
JOBS: dict[str, dict] = {
    "banded": {"n": 64},
    "brusselator": {"N": 8},
    "cnn": {"batch": 3, "channels": 2},
    "contact": {},
    "heat": {"N": 8, "pattern": False},
    "mlp": {"n": 40, "m": 30, "hidden": 16},
    "robot_arm": {"batch": 5},
    "robot_arm_single": {},
    "rosenbrock": {"n": 30},
    "trajectory": {"waypoints": 8, "obstacles": 3},
}
#: Larger parameters for the cost measurement.
COST_JOBS: dict[str, dict] = {
    "mlp": {"n": 4000, "m": 4000, "hidden": 1024},
    "heat": {"N": 400, "pattern": False},
    "cnn": {"batch": 64, "channels": 8},
    "rosenbrock": {"n": 1000000},
}


def build(job: str, params: dict, dtype: str):
    """A built-in job's problem (``robot_arm_single``: the unbatched robot arm)."""
    from pipeline.problem import build_problem

    return build_problem(job.removesuffix("_single"), {**params, "dtype": dtype})


def false_alarms(report: Report) -> None:
    from pipeline.maths.adjoint import ADJOINT_RTOL, adjoint_check

    rows = []
    worst = {"float32": 0.0, "float64": 0.0}
    alarms = 0
    for job, params in JOBS.items():
        for dtype in ("float32", "float64"):
            p = build(job, params, dtype)
            checks = [adjoint_check(p.fn, p.x, kind=p.kind, seed=s) for s in range(SEEDS)]
            bad = [c for c in checks if not c.agree]
            alarms += len(bad)
            eps = torch.finfo(getattr(torch, dtype)).eps / 2  # unit roundoff
            top = max(c.rel_error for c in checks)
            worst[dtype] = max(worst[dtype], top)
            rows.append([job, p.kind, dtype, top, top / eps, ADJOINT_RTOL[dtype] / eps,
                         len(bad), bad[0].reason if bad else ""])
    report.table(
        f"(1) rel_error over seeds 0..{SEEDS - 1} (unit roundoff u = eps / 2)",
        ["job", "kind", "dtype", "max rel_error", "in u", "tolerance in u", "false alarms",
         "reason"],
        rows,
    )
    report.facts["worst_rel_error"] = worst
    report.facts["false_alarms"] = alarms
    report.target(Target("false alarms on the built-in jobs", alarms, 0,
                         higher_is_better=False, unit=""))
    for dtype, value in worst.items():
        report.target(Target(f"margin of the {dtype} tolerance over the largest rel_error",
                             ADJOINT_RTOL[dtype] / max(value, 1e-300), 10.0))


def cost(report: Report, *, quick: bool, repeats: int) -> None:
    from pipeline.maths import adjoint_check

    rows = []
    ratios, floors = [], []
    for job, params in (JOBS if quick else COST_JOBS).items():
        if job not in COST_JOBS:
            continue
        p = build(job, JOBS[job] if quick else params, "float32")
        x = p.x if p.kind != "batched" else p.x
        fn = p.fn if p.kind != "batched" else (lambda t, f=p.fn: torch.stack([f(s) for s in t]))
        if p.kind == "batched":
            x = p.x[:4]  # the check differentiates the first 4 samples

        def fwd_bwd(fn=fn, x=x, kind=p.kind):
            xg = x.detach().clone().requires_grad_(True)
            y = fn(xg)
            if kind == "hessian":  # the Hessian's unit: one HVP by reverse over reverse
                (g,) = torch.autograd.grad(y, xg, create_graph=True)
                return torch.autograd.grad(g, xg, torch.ones_like(g))
            return torch.autograd.grad(y, xg, torch.ones_like(y))

        def jvp(fn=fn, x=x, kind=p.kind):
            if kind == "hessian":
                return torch.func.jvp(torch.func.grad(fn), (x,), (torch.ones_like(x),))
            return torch.func.jvp(fn, (x,), (torch.ones_like(x),))

        def check(p=p):
            return adjoint_check(p.fn, p.x, kind=p.kind)

        times = interleaved({"fwd+bwd": fwd_bwd, "jvp": jvp, "adjoint_check": check},
                            repeats=repeats)
        t_unit, t_jvp = median(times["fwd+bwd"]), median(times["jvp"])
        t_check = median(times["adjoint_check"])
        ratios.append(t_check / t_unit)
        floors.append(t_check / (t_unit + t_jvp))
        rows.append([job, p.kind, str(params if not quick else JOBS[job]),
                     f"{t_unit * 1e3:.2f} ms", f"{t_jvp * 1e3:.2f} ms",
                     f"{t_check * 1e3:.2f} ms", t_check / t_unit, t_check / (t_unit + t_jvp)])
    report.table("(2) cost of the check (float32, 1 thread); the floor is one fwd+bwd and one "
                 "JVP, the two products the check compares",
                 ["job", "kind", "params", "fwd+bwd", "jvp", "adjoint_check",
                  "check / fwd+bwd", "check / floor"], rows)
    report.facts["cost_in_fwd_bwd_max"] = max(ratios)
    report.facts["cost_over_floor_max"] = max(floors)
    report.target(Target("check cost / (one fwd+bwd + one JVP), worst job", max(floors), 1.5,
                         higher_is_better=False))


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    report = Report("adjoint", quick=args.quick)
    false_alarms(report)
    cost(report, quick=args.quick, repeats=max(args.repeats or (3 if args.quick else 7), 3))
    report.finish(args.json)


if __name__ == "__main__":
    main()
