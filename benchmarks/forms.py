"""The choices jacpipe makes by measurement for a compiled pass, each side timed in one run.

(1) Inductor's two forms of each compressed pass (NOTE: [two codegens per
    pass] in ``pipeline/maths/compiled.py``): the default settings and
    intermediates materialised once (``compiled.ALTERNATIVE``), the same pass
    on the same colour seeds.
(2) A checked evaluation's check fused into the pass's compiled graph or run
    apart (NOTE: [the check fused into the pass] in
    ``pipeline/sparse/compressed.py``): one graph ``(x, seeds, reads, u, v, w)
    -> (B, entries, Jᵀu, the check's dots)`` against the pass and the check's
    reverse pass called one after the other (both in the default form), then
    the dots over the entries.
(3) The entries read inside the compiled pass (NOTE: [entries read inside the
    compiled pass]), ``(x, seeds, reads) -> (B, B.flat[reads])``, against the
    plain pass followed by an eager ``index_select`` (default form, unchecked).

The sparse cases of ``benchmarks/peers.py`` at n >= 9 * 10^4, float64, the
calls interleaved and shuffled; the ratios are alternative / default and
fused / apart (below 1: the measured choice should take the alternative,
or fused), and inside / after (below 1: reading in the pass is faster).
Each case runs in a fresh interpreter. Writes ``benchmarks/results/forms.json``.

    python -m benchmarks.forms               # about 3 minutes on 2 cores
    python -m benchmarks.forms --quick       # two cases
"""

from __future__ import annotations

import json
import os

# Before torch is imported anywhere in this process (libgomp reads it once).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.harness import Report, interleaved, median, parser  # noqa: E402
from benchmarks.peers import seconds  # noqa: E402

HERE = Path(__file__).resolve().parent
CASES = [("broydn3d", "hessian", 100_000), ("rosenbrock", "hessian", 100_000),
         ("arwhead", "hessian", 100_000), ("brusselator", "jacobian", 256),
         ("heat", "jacobian", 300)]
QUICK = [("broydn3d", "hessian", 100_000), ("rosenbrock", "hessian", 100_000)]


def case(job: str, kind: str, size: int, repeats: int) -> dict[str, Any]:
    """Both measurements for one case (run in its own interpreter by :func:`main`)."""
    import torch

    from benchmarks.peers import passes, torch_case
    from pipeline.maths import compiled
    from pipeline.sparse import compressed
    from pipeline.sparse.coloring import choose_coloring
    from pipeline.sparse.detect import trace_sparsity

    fn, x = torch_case(job, size)
    hessian = kind == "hessian"
    pattern = trace_sparsity(fn, x, kind=kind, max_density=None).pattern
    coloring = choose_coloring(pattern, symmetric=hessian)
    rows = compressed.sparse_hessian_rows if hessian else compressed.sparse_jacobian_rows
    rows(fn, x, 0, pattern.shape[0], pattern, coloring, compile="off")  # the plan, eagerly
    plan = next(reversed(compressed._PLANS.values()))[2]
    seeds = plan.tensors[(x.dtype, x.device)][0]
    xf = x.detach().reshape(-1)
    u, v, w, _ = compressed._probe(plan, xf)
    evaluate, check = passes(fn, x, "hvp" if hessian else "fwd")
    entries = compressed._gathered(evaluate)
    fused = compressed._with_check(entries, check)

    default = compiled._compile(entries)
    alternative = compiled._compile(entries, compiled.ALTERNATIVE)
    plain = compiled._compile(evaluate)
    check_pass, both = compiled._compile(check), compiled._compile(fused)

    def after() -> torch.Tensor:  # the plain pass, then the entries by index_select
        return plain(xf, seeds).reshape(-1).index_select(0, flat)

    def apart() -> tuple:  # the two passes, the check's dots (_checked_values)
        values, j = default(xf, seeds, flat)[1], check_pass(xf, u).to(torch.float64)
        return values, float(values.to(torch.float64).dot(w)), float(j.dot(v)), float(j.norm())

    def fused_() -> tuple:  # one graph
        out = both(xf, seeds, flat, u, v, w)
        return out[1], out[3].tolist()

    flat = plan.tensors[(x.dtype, x.device)][1]
    methods = {"inside": lambda: default(xf, seeds, flat)[1],
               "alternative": lambda: alternative(xf, seeds, flat)[1],
               "after": after,
               "apart": apart,
               "fused": fused_}
    want = evaluate(xf, seeds).reshape(-1).index_select(0, flat)
    for name, call in methods.items():  # compiles; the same numbers as eager
        got = call()
        got = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    times = interleaved(methods, repeats=repeats, warmup=3, shuffle=True)
    return {name: median(ts) for name, ts in times.items()} | {"colors": coloring.num_colors}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args()
    repeats = args.repeats or (9 if args.quick else 21)
    report = Report("forms", args.quick)
    report.facts["threads"] = args.threads
    rows = []
    for job, kind, size in QUICK if args.quick else CASES:
        code = ("import json, torch\n"
                f"torch.set_num_threads({args.threads})\n"
                "from benchmarks.forms import case\n"
                f"print(json.dumps(case({job!r}, {kind!r}, {size}, {repeats})))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=HERE.parent)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        name = f"{job} {kind} size {size:,}"
        report.facts[name] = r
        rows.append([name, r["colors"], seconds(r["after"]), seconds(r["inside"]),
                     f"{r['inside'] / r['after']:.2f}x", seconds(r["alternative"]),
                     f"{r['alternative'] / r['inside']:.2f}x", seconds(r["apart"]),
                     seconds(r["fused"]), f"{r['fused'] / r['apart']:.2f}x"])
        print(f"{name}: {r}", flush=True)
    report.table(f"compiled pass forms, float64, medians of {repeats}, {args.threads} "
                 "thread(s), interleaved and shuffled",
                 ["case", "colours", "pass, entries after it", "entries inside",
                  "inside / after", "inside, materialised", "materialised / default",
                  "pass + check apart", "fused", "fused / apart"], rows)
    report.finish(args.json)


if __name__ == "__main__":
    main()
