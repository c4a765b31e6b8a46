"""Correctness checks on a GPU (no Ray needed): the CUDA paths of the worker, adjoint, sparsity.

Run where a GPU exists (``bash benchmarks/gpu.sh`` runs the timings; this the
checks): ``python -m benchmarks.gpu_checks [--device cuda]``. Each check
compares the GPU's rows with torch's own reference on the same device and
prints one JSON document; exit 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch


def _mlp_on(device: str, out: str) -> dict[str, Any]:
    """A 1,500 x 1,200 MLP Jacobian through the in-process executor on ``device``."""
    import pipeline
    from pipeline.problem import build_problem

    t0 = time.perf_counter()
    summary = pipeline.run("mlp", params={"n": 1200, "m": 1500, "device": device}, out=out,
                           executor="local", device=device, shards=3, progress=False,
                           echo=lambda _: None)
    seconds = time.perf_counter() - t0
    got = pipeline.read_jacobian(out)
    problem = build_problem("mlp", {"n": 1200, "m": 1500, "device": device})
    ref = torch.func.jacrev(problem.fn)(problem.x).detach().cpu().numpy()
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
    devices = sorted({s.device for s in summary.manifest.committed})
    return {"ok": err < 1e-5 and devices == [device], "rel_error": err, "devices": devices,
            "seconds": round(seconds, 3)}


def _adjoint_on(device: str) -> dict[str, Any]:
    """The adjoint check: no false alarm on a smooth function, an alarm under no_grad."""
    from pipeline.maths import adjoint_check

    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(300, 40, generator=g, dtype=torch.float64).to(device)
    x = torch.linspace(-1, 1, 40, dtype=torch.float64, device=device)

    def frozen(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            c = 10 * torch.sin(w @ t)
        return torch.tanh(w @ t) + c

    smooth = adjoint_check(lambda t: torch.tanh(w @ t), x)
    broken = adjoint_check(frozen, x)
    return {"ok": smooth.agree and not broken.agree, "smooth_rel": smooth.rel_error,
            "broken_rel": broken.rel_error}


def _sparsity_on(device: str) -> dict[str, Any]:
    """Detection with x (and the residual's constants) on ``device``: the hand pattern."""
    from jobs.heat import laplacian
    from pipeline.sparse import detect_sparsity, stencil_pattern

    n = 24
    u_prev = torch.rand(n, n, dtype=torch.float64, device=device)
    x = torch.rand(n, n, dtype=torch.float64, device=device)

    def fn(v: torch.Tensor) -> torch.Tensor:
        return v - u_prev - 1e-4 * laplacian(v + 0.5 * v**3 / 3, 1.0 / (n + 1))

    pattern = detect_sparsity(fn, x)
    same = (pattern != stencil_pattern(n, 5)).nnz == 0
    return {"ok": bool(same), "nnz": int(pattern.nnz)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {"device": args.device, "torch": torch.__version__}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in [("mlp_local_executor", lambda: _mlp_on(args.device, f"{tmp}/m")),
                            ("adjoint", lambda: _adjoint_on(args.device)),
                            ("sparsity", lambda: _sparsity_on(args.device))]:
            try:
                report[name] = check()
            except Exception as exc:  # noqa: BLE001 - a check that raises has failed
                report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
    report["ok"] = all(v["ok"] for v in report.values() if isinstance(v, dict))
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
