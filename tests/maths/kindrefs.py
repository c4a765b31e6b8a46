"""Test helpers: autograd references of the Hessian and batched kinds, and a small run."""

from __future__ import annotations

import torch
from torch.autograd.functional import hessian, jacobian

from pipeline.runner.driver import RunOptions, run

TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "float64": dict(rtol=1e-12, atol=1e-12)}


HESSIAN_JOBS = {"rosenbrock": {"n": 30}, "trajectory": {"waypoints": 8, "obstacles": 3}}


BATCHED_JOBS = {"cnn": {"batch": 3, "channels": 2}, "robot_arm": {"batch": 5}}


def hessian_reference(problem):
    """``torch.autograd.functional.hessian`` as an ``(n, n)`` matrix."""
    n = problem.x.numel()
    return hessian(lambda t: problem.fn(t).reshape(()), problem.x).reshape(n, n)


def batched_reference(problem):
    """A per-sample loop of ``torch.autograd.functional.jacobian``: ``(B, m, n)``."""
    xs = problem.x
    return torch.stack([jacobian(problem.fn, xs[b]).reshape(-1, xs[b].numel())
                        for b in range(xs.shape[0])])


def assert_close(got, ref, dtype):
    got, ref = torch.as_tensor(got), torch.as_tensor(ref)
    assert got.dtype == ref.dtype == getattr(torch, dtype)
    scale = float(ref.abs().max())
    tol = TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))


def run_job(tmp_path, job, params, **options):
    out = tmp_path / job
    params = [f"{k}={v}" for k, v in params.items()]
    run(RunOptions(job=job, params=params, out=str(out), progress=False, **options),
        echo=lambda _: None)
    return out
