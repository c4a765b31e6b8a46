"""Small jobs in process, checks before Ray, no Ray when nothing is left, closures (issue 15)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

import pipeline
from pipeline import Problem, read_jacobian
from pipeline.core.errors import JacpipeError
from tests.manifests import read_doc

SMALL = ["-p", "n=30", "-p", "m=20", "-p", "hidden=8"]


def _jacpipe(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (so Ray's state is its own), executor left to `auto`."""
    environ = {k: v for k, v in os.environ.items() if k != "JACPIPE_EXECUTOR"}
    environ["PYTHONPATH"] = os.getcwd()
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)],
                          capture_output=True, text=True, env=environ, timeout=300)


def test_auto_runs_a_small_job_in_process_and_a_rerun_starts_nothing(tmp_path):
    out = tmp_path / "out"
    first = _jacpipe("run", "mlp", *SMALL, "--out", out, "--no-progress", "--verify")
    assert first.returncode == 0, first.stderr
    assert "executor: local" in first.stderr and "starting Ray (" not in first.stderr
    assert "MATCH" in first.stdout
    man = read_doc(out)
    assert man["status"] == "complete" and {s["node_id"] for s in man["shards"]} == {"local"}
    again = _jacpipe("run", "mlp", *SMALL, "--out", out, "--no-progress", "--executor", "ray")
    assert again.returncode == 0, again.stderr
    assert "starting Ray (" not in again.stderr and "resumed)" in again.stdout


def test_bad_requests_exit_2_before_ray_starts(tmp_path):
    t0 = time.perf_counter()
    result = _jacpipe("run", "mlp", *SMALL, "--gpus-per-shard", "1", "--executor", "ray",
                      "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    assert "--gpus-per-shard 1" in result.stderr and "starting Ray (" not in result.stderr
    other = _jacpipe("run", "heat", "-p", "N=4", "--executor", "ray", "--out", tmp_path / "h")
    assert other.returncode == 0, other.stderr
    taken = _jacpipe("run", "mlp", *SMALL, "--executor", "ray", "--out", tmp_path / "h")
    assert taken.returncode == 2 and "holds a result of job 'heat'" in taken.stderr
    assert "starting Ray (" not in taken.stderr
    del t0


@pytest.mark.parametrize("method", ["rev", "fwd"])
def test_local_and_ray_executors_write_bitwise_equal_parts(ray_session, tmp_path, method):
    opts = dict(params={"n": 24, "m": 40, "hidden": 8}, shards=3, chunk_size=7, method=method,
                progress=False)
    pipeline.run("mlp", out=str(tmp_path / "ray"), executor="ray", echo=lambda _: None, **opts)
    pipeline.run("mlp", out=str(tmp_path / "local"), executor="local", echo=lambda _: None,
                 **opts)
    for i in range(3):
        name = f"part-{i:05d}.parquet"
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def _closure_problem(dtype=torch.float64) -> Problem:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(12, 9, generator=g, dtype=dtype)
    b = torch.randn(12, generator=g, dtype=dtype)
    return Problem(fn=lambda t: torch.tanh(w @ t + b) * t.sum(), x=torch.randn(9, generator=g,
                                                                                dtype=dtype))


def _module_problem() -> Problem:
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    net = net.double()
    for p in net.parameters():
        p.requires_grad_(False)
    return Problem(fn=net, x=torch.linspace(-1, 1, 6, dtype=torch.float64))


@pytest.mark.parametrize("executor", ["local", "ray"])
@pytest.mark.parametrize("make", [_closure_problem, _module_problem])
def test_python_api_with_a_closure_or_a_module(ray_session, tmp_path, executor, make):
    problem = make()
    summary = pipeline.run(problem, out=str(tmp_path / "o"), shards=2, executor=executor,
                           progress=False, echo=lambda _: None)
    assert summary.manifest.job.startswith("python:")
    got = read_jacobian(tmp_path / "o")
    ref = jacobian(problem.fn, problem.x).reshape(got.shape).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    report = pipeline.compare_result(str(tmp_path / "o"), problem=problem)
    assert report.ok
    with pytest.raises(JacpipeError, match="computed from a Problem built in Python"):
        pipeline.compare_result(str(tmp_path / "o"))


def test_python_api_in_a_newton_loop_on_the_callers_ray(ray_session, tmp_path):
    """Many runs on one Ray session: x changes, the Jacobian follows, Ray is not restarted."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64) / 8 + torch.eye(8,
                                                                               dtype=torch.float64)

    def residual(t: torch.Tensor) -> torch.Tensor:
        return a @ t + 0.1 * t**3 - 1

    x = torch.zeros(8, dtype=torch.float64)
    for step in range(5):
        problem = Problem(fn=residual, x=x)
        out = str(tmp_path / f"step{step}")
        pipeline.run(problem, out=out, executor="ray", shards=2, progress=False,
                     echo=lambda _: None)
        jac = torch.from_numpy(read_jacobian(out))
        np.testing.assert_allclose(jac, jacobian(residual, x), rtol=1e-12, atol=1e-12)
        x = x - torch.linalg.solve(jac, residual(x))
    assert float(residual(x).norm()) < 1e-10  # quadratic convergence: the Jacobians are exact
    import ray

    assert ray.is_initialized()


def test_python_api_refuses_unknown_options():
    with pytest.raises(JacpipeError, match="unknown option\\(s\\) shardz"):
        pipeline.run("mlp", shardz=3)


def test_the_readme_closure_example_runs(tmp_path):
    import re
    from pathlib import Path

    readme = Path("README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    (code,) = [b for b in blocks if "out/closure" in b]
    env = {k: v for k, v in os.environ.items() if k != "JACPIPE_EXECUTOR"}
    env["PYTHONPATH"] = os.getcwd()
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "closure" / "_manifest.parquet").exists()
