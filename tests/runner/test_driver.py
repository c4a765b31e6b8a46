"""``pipeline.runner.driver``: whole runs: executors, resume, kinds, trust, the Python API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.autograd.functional import jacobian

import pipeline
from benchmarks.soak import kill_session, session_processes, soak, wait_for_commits
from pipeline import Problem, read_jacobian
from pipeline.analysis.compare import compare, sample_rows
from pipeline.core.errors import JacpipeError
from pipeline.problem.problem import build_problem
from tests.clitools import error_line
from tests.faultruns import (
    CHUNKS,
    CRASHY,
    ROWS,
    assert_rows_exactly_once,
    copy_of_clean,
    invoke,
    manifest,
    run_crashy,
)
from tests.manifests import read_doc
from tests.maths.kindrefs import (
    HESSIAN_JOBS,
    assert_close,
    batched_reference,
    hessian_reference,
    run_job,
)

SMALL = ["-p", "n=30", "-p", "m=20", "-p", "hidden=8"]


def _jacpipe(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (so Ray's state is its own), executor left to `auto`."""
    environ = {k: v for k, v in os.environ.items() if k != "JACPIPE_EXECUTOR"}
    environ["PYTHONPATH"] = os.getcwd()
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)],
                          capture_output=True, text=True, env=environ, timeout=300)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_readme_closure_example_runs(tmp_path):
    import re
    from pathlib import Path

    readme = Path("README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    (code,) = [b for b in blocks if "out/closure" in b]
    env = {k: v for k, v in os.environ.items() if k != "JACPIPE_EXECUTOR"}
    env["PYTHONPATH"] = os.getcwd()
    for _ in range(2):  # the second time finds the result of the first
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp_path / "out" / "closure" / "_manifest.parquet").exists()


def test_nondeterministic_job_is_detected_and_nothing_is_committed(ray_session, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "tests.userjobs:nondeterministic", "--shards", 4, "--out", out,
                    "--no-progress")
    line = error_line(result)
    assert result.exit_code == 2
    assert "nondeterministic job: fn(x) differs between the driver and a worker" in line
    assert "seed every random draw" in line and "shard " in line
    man = manifest(out)
    assert man["status"] == "failed" and man["shards"] == []
    assert not list(out.glob("part-*.parquet"))


def test_driver_sigkill_and_worker_kills_then_resume_loses_and_duplicates_nothing(
    ray_session, tmp_path
):
    """The soak benchmark, small: 24 shards, 3 worker kills, one driver SIGKILL."""
    report = soak(shards=24, kill_fraction=0.125, seed=0, workdir=tmp_path, num_cpus=2,
                  delay=0.25, kill_driver_after=8, echo=lambda s: None)
    assert report["worker_kills"] == report["worker_kills_planned"] == 3
    k = report["committed_at_driver_kill"]
    assert 8 <= k < 24
    # The rerun computed exactly the shards the killed driver had not committed.
    assert report["computed_on_resume"] == 24 - k and report["resumed"] == k
    assert report["computed_by_resume_run_id"] == 24 - k
    assert report["ray_processes_alive_after_kill"] == 0
    assert report["rows_lost"] == 0 and report["rows_duplicated"] == 0
    assert report["values_equal_clean_run"] is True
    assert report["leftover_temp_files"] == [] and report["status"] == "complete"
    assert report["ok"] is True


def test_ctrl_c_exits_130_and_leaves_the_folder_resumable(ray_session, tmp_path, clean):
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    cmd = [sys.executable, "-m", "pipeline.cli", "run", CRASHY, "-p", f"markers={markers}",
           "-p", "delay=0.3", "--shards", "12", *CHUNKS, "--num-cpus", "2", "--out", str(out),
           "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            wait_for_commits(out, 2, proc)
        finally:
            # Like a terminal's Ctrl-C: SIGINT to the whole foreground process group.
            reaped = kill_session(proc, sig=signal.SIGINT)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, stderr
    assert reaped == 0 and session_processes(proc.pid) == []  # embedded Ray went down too
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    man = manifest(out)
    k = len(man["shards"])
    assert man["status"] == "interrupted" and 2 <= k < 12
    assert errors == [f"error: interrupted: {k} of 12 shards committed in {out}; "
                      "rerun the same command to resume"]

    info = invoke("inspect", out, "--json")
    assert info.exit_code == 1
    problems = json.loads(info.output)["problems"]
    assert len(problems) == 12 - k and all(p.endswith("not committed") for p in problems)

    result = run_crashy(out, markers, "-p", "delay=0.3", "--shards", 12)
    assert result.exit_code == 0, result.output
    assert f"({12 - k} computed, {k} resumed)" in result.output
    man = manifest(out)
    assert sum(s["run_id"] == man["run_id"] for s in man["shards"]) == 12 - k
    assert_rows_exactly_once(out)
    assert np.array_equal(read_jacobian(out), clean.values)


def test_corrupt_and_missing_parts_are_named_and_exactly_they_are_recomputed(
    ray_session, tmp_path, clean
):
    out = copy_of_clean(clean, tmp_path)
    truncated, flipped, deleted = (out / f"part-0000{i}.parquet" for i in (2, 4, 5))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01  # same size, one bit
    flipped.write_bytes(bytes(data))
    deleted.unlink()
    expected = {
        "part-00002.parquet": "shard 2 (part-00002.parquet): corrupt (size",
        "part-00004.parquet": "shard 4 (part-00004.parquet): corrupt (checksum mismatch)",
        "part-00005.parquet": "shard 5 (part-00005.parquet): missing",
    }

    info = invoke("inspect", out, "--json")
    assert info.exit_code == 1
    problems = json.loads(info.output)["problems"]
    assert len(problems) == 3
    assert all(p.startswith(e) for p, e in zip(problems, expected.values(), strict=True))
    for command in (["inspect", out], ["compare", out, "--job", CRASHY]):
        result = invoke(*command)
        assert result.exit_code == 1 and "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert [any(f in line for line in errors) for f in expected] == [True] * 3
    assert "MISMATCH" in invoke("compare", out, "--job", CRASHY).output
    with pytest.raises(JacpipeError, match="part-00002.parquet"):
        read_jacobian(out)

    before = manifest(out)
    result = run_crashy(out, clean.markers, "--shards", 6)
    assert result.exit_code == 0, result.output
    assert "(3 computed, 3 resumed)" in result.output
    man = manifest(out)
    fresh = sorted(s["index"] for s in man["shards"] if s["run_id"] == man["run_id"])
    assert fresh == [2, 4, 5] and man["run_id"] != before["run_id"]
    assert invoke("inspect", out).exit_code == 0
    assert np.array_equal(read_jacobian(out), clean.values)


def test_crash_leftovers_are_ignored_by_every_reader_and_cleaned_on_resume(
    ray_session, tmp_path, clean
):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    out = copy_of_clean(clean, tmp_path)
    part3 = (out / "part-00003.parquet").read_bytes()
    leftovers = {
        ".part-00003.0123456789abcdef.tmp": part3[: len(part3) // 2],  # half a part file
        ".part-00001.fedcba9876543210.tmp": part3,  # a whole, valid, uncommitted part
        "._manifest.parquet.0a1b2c.tmp": b"PAR1 half a manifest",
        ".attempt-0123456789ab-00002-deadbeef": b"",
        "..attempt-0123456789ab-00002-cafe.0d0e.tmp": b"",
    }
    for name, data in leftovers.items():
        (out / name).write_bytes(data)

    assert np.array_equal(read_jacobian(out), clean.values)
    info = invoke("inspect", out, "--json")
    assert info.exit_code == 0 and json.loads(info.output)["problems"] == []
    cmp = invoke("compare", out, "--json", "--job", CRASHY)
    assert cmp.exit_code == 0 and json.loads(cmp.output)["ok"] is True
    table = ds.dataset(out, format="parquet").to_table(columns=["row"])
    assert sorted(table.column("row").to_pylist()) == list(range(ROWS))
    frame = pd.read_parquet(out)
    assert sorted(frame["row"]) == list(range(ROWS))
    values = np.stack(frame.sort_values("row")["values"].to_numpy())
    assert np.array_equal(values, clean.values)
    assert sorted(pl.read_parquet(f"{out}/*.parquet")["row"].to_list()) == list(range(ROWS))
    query = f"select count(distinct row), count(*) from '{out}/*.parquet'"
    assert duckdb.sql(query).fetchall() == [(ROWS, ROWS)]

    result = run_crashy(out, clean.markers, "--shards", 6)
    assert result.exit_code == 0, result.output
    assert "(0 computed, 6 resumed)" in result.output
    assert [n for n in os.listdir(out) if n.startswith(".")] == []
    assert np.array_equal(read_jacobian(out), clean.values)


@pytest.mark.parametrize("dtype,layout", [("float64", {"rows_per_shard": 7}),
                                          ("float32", {"shards": 3})])
def test_batched_through_ray_in_sample_blocks(ray_session, tmp_path, dtype, layout):
    out = run_job(tmp_path, "robot_arm", {"batch": 6, "dtype": dtype}, **layout)
    problem = build_problem("robot_arm", {"batch": 6, "dtype": dtype})
    ref = batched_reference(problem).numpy()
    got = read_jacobian(out)
    assert got.shape == (6, 12, 6)
    assert_close(got, ref, dtype)
    man = read_doc(out)
    starts = [a for a, _ in man["plan"]]
    # rows_per_shard=7 cuts samples (m = 12); shards=3 aligns to whole samples.
    assert any(a % 12 for a in starts) == ("rows_per_shard" in layout)
    for part in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(part)
        assert table.column_names == ["row", "sample", "values"]
        rows = table.column("row").to_numpy()
        np.testing.assert_array_equal(table.column("sample").to_numpy(), rows // 12)
    assert_close(read_jacobian(out, sample=4), ref[4], dtype)
    assert_close(read_jacobian(out, sample=[5, 0], as_="torch"), ref[[5, 0]], dtype)
    assert read_jacobian(out, sample=2, reshape=True).shape == (12, 6)
    with pytest.raises(JacpipeError, match="out of range: the result has 6 samples"):
        read_jacobian(out, sample=6)
    with pytest.raises(JacpipeError, match="rows or sample, not both"):
        read_jacobian(out, [0], sample=0)
    report = compare(str(out))
    assert report.ok and report.mode == "all" and report.rows_checked == 72


@pytest.mark.parametrize("job,dtype", [("rosenbrock", "float32"), ("trajectory", "float64")])
def test_hessian_through_ray_and_symmetry(ray_session, tmp_path, job, dtype):
    params = {**HESSIAN_JOBS[job], "dtype": dtype}
    # the dense Hessian rows (--method auto would detect rosenbrock's tridiagonal
    # pattern and colour it: tests/sparse/test_detect.py)
    out = run_job(tmp_path, job, params, shards=3, method="rev")
    ref = hessian_reference(build_problem(job, params)).numpy()
    got = read_jacobian(out)
    assert_close(got, ref, dtype)
    with pytest.raises(JacpipeError, match="only batched results have samples"):
        read_jacobian(out, sample=0)
    full = compare(str(out))
    assert full.ok and full.mode == "all"
    assert full.symmetry_error == pytest.approx(float(np.abs(got - got.T).max()))
    sampled = compare(str(out), rows=6)
    assert sampled.ok and sampled.mode == "sampled" and sampled.rows_checked == 6
    # Sampled: the symmetry of the principal sub-block H[R, R] of the checked rows.
    pick = np.arange(ref.shape[0])[sample_rows(ref.shape[0], 6, 0)]
    sub = got[np.ix_(pick, pick)]
    assert sampled.symmetry_error == pytest.approx(float(np.abs(sub - sub.T).max()))
    assert sampled.symmetry_error <= 1e-5 * np.abs(ref).max()


def _cli(*args: object):
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_auto_keeps_reverse_mode_when_forward_mode_disagrees(ray_session, tmp_path, dtype):
    out = tmp_path / "out"
    result = _cli("run", "tests.userjobs:tall_no_grad", "-p", f"dtype={dtype}", "--out", out,
                  "--no-progress", "--verify")
    assert result.exit_code == 0, result.output
    assert "note: reverse mode, not forward: forward and reverse mode give different" in \
        result.output
    man = read_doc(out)
    assert man["method"] == "rev" and man["adjoint_check"]["agree"] is False
    assert "MATCH" in result.output and "MISMATCH" not in result.output
    forced = _cli("run", "tests.userjobs:tall_no_grad", "-p", f"dtype={dtype}", "--method",
                  "fwd", "--out", tmp_path / "fwd", "--no-progress")
    assert forced.exit_code == 0, forced.output
    assert "warning: --method fwd although forward and reverse mode give" in forced.output
    assert read_doc(tmp_path / "fwd")["method"] == "fwd"


def test_auto_takes_forward_mode_when_the_modes_agree(ray_session, tmp_path):
    out = tmp_path / "out"
    result = _cli("run", "tests.userjobs:tall", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    man = read_doc(out)
    assert man["method"] == "fwd" and man["adjoint_check"]["agree"] is True


def test_a_resume_after_a_backward_only_change_is_refused(ray_session, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ("run", "tests.userjobs:custom_backward", "--shards", 3, "--out", out, "--no-progress")
    first = _cli(*args)
    assert first.exit_code == 0, first.output
    # The backward now scales by another constant (as after an edit of only the
    # custom backward): fn(x), x and the shapes are unchanged.
    monkeypatch.setenv("JACPIPE_TEST_BACKWARD_SCALE", "2.0")
    again = _cli(*args)
    assert again.exit_code == 2, again.output
    assert "the job changed since these shards were written (differs in: fingerprint: " \
           "derivative); --overwrite to start again" in again.output


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_trust_classes_end_to_end_through_the_cli(ray_session, tmp_path, dtype):
    d = ["-p", f"dtype={dtype}", "--no-progress"]
    # 1. fn writes into its input: refused with the right reason, not "nondeterministic"
    writes = _cli("run", "tests.userjobs:writes_input", *d, "--out", tmp_path / "w")
    assert writes.exit_code == 2, writes.output
    assert "writes into its input" in writes.output and "nondeterministic" not in writes.output
    # 3. a per-sample output of another size: one line naming the sample
    ragged = _cli("run", "tests.userjobs:ragged_samples", *d, "--out", tmp_path / "r")
    assert ragged.exit_code != 0 and "Traceback" not in ragged.output
    assert "fn(xs[" in ragged.output and "entries" in ragged.output
    # 5. NaN in fn(x): a run like any other, and compare matches NaN with NaN
    nan = _cli("run", "tests.userjobs:nan_at_x", *d, "--out", tmp_path / "n", "--verify")
    assert nan.exit_code == 0 and "MATCH" in nan.output, nan.output
    assert "nondeterministic" not in nan.output
    # 6. a Hessian of a function torch.func cannot transform: autograd's answer
    hess = _cli("run", "tests.userjobs:old_style_hessian", *d, "--out", tmp_path / "h",
                "--verify")
    assert hess.exit_code == 0 and "MATCH" in hess.output, hess.output
    # 7. rows come back in x's dtype
    man = read_doc(tmp_path / "h")
    assert man["dtype"] == dtype
    from pipeline import read_jacobian

    assert str(read_jacobian(tmp_path / "h").dtype) == dtype


def test_the_colouring_note_of_a_sparse_run_is_printed_once(tmp_path):
    """The sparse colouring line used to print twice (as a plan note and again by _plan)."""
    lines: list[str] = []
    summary = pipeline.run("banded", params={"n": 40, "k": 2}, shards=2, out=str(tmp_path / "o"),
                           executor="local", progress=False, echo=lines.append)
    colouring = [line for line in lines if "colours" in line]
    assert len(colouring) == 1, lines
    assert colouring[0].startswith("note: sparse: ") and "dense passes" in colouring[0]
    assert summary.manifest.method == "sparse"


def test_a_result_larger_than_the_free_disk_space_is_warned_about_before_it_starts(
    tmp_path, monkeypatch
):
    """A run whose result exceeds the free space of --out's file system used to plan silently."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    asked: list[str] = []

    def tiny_disk(path):
        asked.append(str(path))
        return usage(10**9, 10**9 - 1000, 1000)  # 1 kB free

    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    lines: list[str] = []
    out = tmp_path / "not" / "yet"
    pipeline.run("mlp", params={"n": 30, "m": 20, "hidden": 4}, shards=2, out=str(out),
                 executor="local", progress=False, echo=lines.append)
    warnings = [line for line in lines if "free" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), lines
    assert "2.4 kB" in warnings[0] and "1.0 kB free" in warnings[0], warnings[0]
    assert asked == [str(out)]
    # enough room: no warning
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    lines.clear()
    pipeline.run("mlp", params={"n": 30, "m": 20, "hidden": 4}, shards=2,
                 out=str(tmp_path / "roomy"), executor="local", progress=False,
                 echo=lines.append)
    assert not [line for line in lines if "free" in line], lines


# ---------------------------------------------------------------------------
# Never silently wrong: forward-mode and vmap checks on every path (issue 25)
# ---------------------------------------------------------------------------


def _no_grad_product(v):
    with torch.no_grad():
        c = 2 * v
    return c * v.sin() + v


def _local_run(problem, out, **options):
    lines: list[str] = []
    summary = pipeline.run(problem, out=str(out), executor="local", progress=False,
                           echo=lines.append, **options)
    return summary, lines, read_doc(out)


def test_a_sparse_run_whose_forward_mode_disagrees_uses_a_row_colouring(tmp_path):
    import scipy.sparse as sp

    x = torch.linspace(0.3, 1.7, 12, dtype=torch.float64)
    problem = Problem(fn=_no_grad_product, x=x, sparsity=sp.eye(12, format="csr"))
    _, lines, man = _local_run(problem, tmp_path / "out")
    assert man["coloring"]["mode"] == "rev" and man["adjoint_check"]["agree"] is False
    assert any("row colouring (reverse mode), not column colouring" in line for line in lines)
    got = read_jacobian(str(tmp_path / "out"))
    np.testing.assert_allclose(np.asarray(got.toarray() if hasattr(got, "toarray") else got),
                               jacobian(_no_grad_product, x).numpy(), rtol=1e-12, atol=1e-12)


_Y0 = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)


def _cdist(t):
    return torch.cdist(t.reshape(-1, 3), _Y0)


def test_a_wrong_batching_rule_is_caught_by_the_spot_check(tmp_path):
    x = torch.linspace(-0.7, 0.9, 15, dtype=torch.float64)
    _, lines, man = _local_run(Problem(fn=_cdist, x=x), tmp_path / "out")
    assert man["vmap_check"]["agree"] is False and "without vmap" in man["vmap_check"]["reason"]
    assert any(line.startswith("warning: vectorised rows differ") for line in lines)
    np.testing.assert_allclose(np.asarray(read_jacobian(str(tmp_path / "out"))),
                               jacobian(_cdist, x).reshape(20, 15).numpy(), rtol=1e-12,
                               atol=1e-12)


_W = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(8, 2)


def _tall_hooked(v):
    h = _W @ v
    g = h * 2
    if g.requires_grad:
        g.register_hook(lambda grad: grad * 3)
    return g.sin() * h  # forward and reverse mode agree where v = 0 only


def test_per_sample_forward_mode_is_checked_past_the_samples_the_run_checked(tmp_path):
    xs = torch.zeros(16, 2, dtype=torch.float64)
    xs[[5, 10]] = torch.tensor([[0.4, -0.3], [0.8, 0.5]], dtype=torch.float64)
    problem = Problem(fn=_tall_hooked, x=xs, kind="batched")  # tall: auto picks forward mode
    _, lines, man = _local_run(problem, tmp_path / "out", shards=2)
    # the run's check drew samples 0, 3, 9, 13 (all zero) and passed; each shard's own
    # check covers all of its samples, found the difference and used reverse mode
    assert man["method"] == "fwd" and man["adjoint_check"]["agree"] is True
    reported = [c for s in man["shards"] for c in s["checks"]]
    assert reported and all("computed by reverse mode instead" in c for c in reported)
    assert any("per-sample rows: forward and reverse mode" in line for line in lines)
    ref = torch.cat([jacobian(_tall_hooked, s) for s in xs]).numpy()
    np.testing.assert_allclose(np.asarray(read_jacobian(str(tmp_path / "out"))).reshape(-1, 2),
                               ref, rtol=1e-12, atol=1e-12)


def test_ragged_per_sample_outputs_are_one_sample_shape_error(tmp_path):
    from pipeline.core.errors import SampleShapeError

    xs = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(6, 1)
    problem = Problem(fn=lambda t: t.repeat(int(t.item()) % 3 + 1), x=xs, kind="batched")
    wanted = r"fn\(xs\[1\]\) has 3 entries \(shape \(3,\)\) but fn\(xs\[0\]\) has 2"
    with pytest.raises(SampleShapeError, match=wanted):
        pipeline.run(problem, out=str(tmp_path / "o"), executor="local", echo=lambda _: None)


def _params_problem() -> Problem:
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
    return Problem.from_module(net, torch.randn(5, 4, dtype=torch.float64))


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_parameter_jacobians_of_a_module_in_memory(request, tmp_path, executor):
    if executor == "ray":
        request.getfixturevalue("ray_session")  # the module is pickled to the workers
    problem = _params_problem()
    out = tmp_path / "o"
    pipeline.run(problem, out=str(out), shards=3, executor=executor, progress=False,
                 echo=lambda _: None)
    got = read_jacobian(out)
    net, xs = problem.fn.module, problem.x
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}
    jac = torch.func.vmap(torch.func.jacrev(
        lambda p, x: torch.func.functional_call(net, {**p, **buffers}, (x[None],))[0]),
        in_dims=(None, 0))(params, xs)
    ref = torch.cat([jac[k].reshape(5, 3, -1) for k in params], dim=2).numpy()
    assert got.shape == ref.shape == (5, 3, problem.fn.numel)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(read_jacobian(out, sample=2), ref[2], rtol=1e-12, atol=1e-12)
    result = pipeline.open_jacobian(out)
    layout = result.manifest.fingerprint["parameters"]["layout"]
    assert [row["name"] for row in layout] == list(params)
    v = np.random.default_rng(0).standard_normal(problem.fn.numel)
    np.testing.assert_allclose(result.as_linear_operator() @ v, ref.reshape(15, -1) @ v,
                               rtol=1e-10, atol=1e-12)
    assert pipeline.compare_result(str(out), problem=problem).ok


def test_ray_starts_early_only_where_the_run_needs_it_whatever_the_checks_find(
        tmp_path, monkeypatch):
    """NOTE: [Ray starts while the job is checked]: new or replaced folders, --executor ray."""
    from pipeline.core.options import RunOptions
    from pipeline.runner import driver

    monkeypatch.setattr(driver, "ray_running", lambda: False)  # a test session's Ray aside

    def early(**kw: object) -> bool:
        kw.setdefault("out", str(tmp_path / "o"))
        return driver._starts_ray_early(RunOptions(job="mlp", params=["n=4", "m=3"], **kw))

    assert early(executor="ray") and early(executor="ray", shards=2)
    assert not early(executor="auto") and not early(executor="local")
    assert not early(executor="ray", gpus_per_shard=1) and not early(executor="ray", device="cuda")
    assert not early(executor="ray", address="127.0.0.1:6379")
    assert early(executor="ray", dtype="float64")
    assert not driver._starts_ray_early(RunOptions(  # no dtype parameter: check_job refuses it
        job="tests.userjobs:branchy", executor="ray",
        dtype="float64", out=str(tmp_path / "b")))
    with pytest.raises(JacpipeError, match="nope"):  # a typo: refused before Ray, as before
        driver._starts_ray_early(RunOptions(job="mlp", params=["nope=1"], executor="ray",
                                            out=str(tmp_path / "o")))
    with pytest.raises(JacpipeError, match="no_such_job"):
        driver._starts_ray_early(RunOptions(job="no_such_job", executor="ray",
                                            out=str(tmp_path / "o")))
    # a folder with a result: resumed (maybe finished) or refused before Ray; replaced early
    pipeline.run("mlp", params={"n": 4, "m": 3}, out=str(tmp_path / "o"), executor="local",
                 progress=False)
    assert not early(executor="ray")  # resume: perhaps nothing to compute, no Ray
    assert early(executor="ray", resume=False) and early(executor="ray", overwrite=True)
    assert not driver._starts_ray_early(RunOptions(  # another job's result: prepare() refuses
        job="mlp", params=["n=5", "m=3"], executor="ray", resume=False, out=str(tmp_path / "o")))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a result")
    assert not early(executor="ray", out=str(tmp_path / "junk"))
    assert not early(executor="ray", out=str(tmp_path / "junk"), overwrite=True)
    (tmp_path / "empty").mkdir()
    assert early(executor="ray", out=str(tmp_path / "empty"))


#: In a fresh process (no Ray of a test session): a check failing while Ray starts
#: (the CLI's one line, Ray stopped), then a run whose Ray started during its checks.
_EARLY_RAY = """
import json, sys
import ray
from typer.testing import CliRunner
from pipeline.cli import app
from pipeline.core.options import RunOptions
from pipeline.runner.cluster import embedded_running
from pipeline.runner.driver import run_command
bad, good = sys.argv[1], sys.argv[2]
failed = CliRunner().invoke(app, ["run", "tests.userjobs:random_windows", "--executor", "ray",
                                  "--num-cpus", "2", "--out", bad])
after_failure = [ray.is_initialized(), embedded_running()]
lines = []
summary = run_command(RunOptions(job="mlp", params=["n=30", "m=20", "dtype=float64"],
                                 executor="ray", shards=4, num_cpus=2, out=good,
                                 progress=True), lines.append)
print(json.dumps({"code": failed.exit_code, "output": failed.output, "after": after_failure,
                  "lines": lines, "computed": summary.computed,
                  "up": [ray.is_initialized(), embedded_running()]}))
"""


@pytest.mark.slow  # a fresh process, two Ray start-ups
def test_ray_started_during_the_checks_is_stopped_when_a_check_fails_and_results_are_unchanged(
        tmp_path):
    bad, good = tmp_path / "bad", tmp_path / "good"
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("RAY_") and k != "JACPIPE_EXECUTOR"}
    environ["PYTHONPATH"] = os.getcwd()
    proc = subprocess.run([sys.executable, "-c", _EARLY_RAY, str(bad), str(good)],
                          capture_output=True, text=True, env=environ, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    # the check failed after Ray had started: one error line, Ray stopped, no folder
    assert doc["code"] == 2 and "Traceback" not in doc["output"], doc["output"]
    errors = [ln for ln in doc["output"].splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "fn uses a random op" in errors[0], doc["output"]
    assert "Ray started in" in doc["output"]  # the overlap did happen
    assert doc["after"] == [False, False] and not bad.exists()
    # a good run: Ray started while checking, the warm-up followed, the result is torch's
    assert any(ln.startswith("Ray started in") for ln in doc["lines"]), doc["lines"]
    assert "workers ready 0/2..." in doc["lines"], doc["lines"]  # the early warm-up, adopted
    assert doc["computed"] == 4 and doc["up"] == [False, False]  # jacpipe run stops its Ray
    problem = build_problem("mlp", {"n": 30, "m": 20, "dtype": "float64"})
    np.testing.assert_allclose(read_jacobian(str(good)), jacobian(problem.fn, problem.x).numpy(),
                               rtol=1e-12, atol=1e-12)
    assert read_doc(good)["status"] == "complete"


_EARLY = """
import json
import numpy as np
from pipeline.analysis.compare import compare
from pipeline.analysis.early import EarlyReference
from pipeline.core.options import RunOptions
from pipeline.maths.kinds import reference_full
from pipeline.runner.driver import run_command

early, seen = EarlyReference(), []
opts = RunOptions(job="mlp", params=["n=40", "m=30", "hidden=8", "dtype=float64"], shards=2,
                  executor="ray", num_cpus=1, out="o", progress=False)
summary = run_command(opts, seen.append, on_checked=early.start)
problem, reference = early.result()
report = compare("o", problem=problem, reference=reference)
print(json.dumps({"started": any(s.startswith("Ray started") for s in seen),
                  "same": bool(np.array_equal(reference[0], reference_full(problem))),
                  "ok": report.ok, "mode": report.mode, "computed": summary.computed}))
"""


@pytest.mark.slow
def test_the_verify_reference_runs_while_an_embedded_ray_starts(tmp_path):
    """NOTE: [The reference while Ray starts], on the path that starts Ray early."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k != "JACPIPE_EXECUTOR"}
    done = subprocess.run([sys.executable, "-c", _EARLY], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**env, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc == {"started": True, "same": True, "ok": True, "mode": "all", "computed": 2}, doc


def test_compile_true_and_false_mean_on_and_off():
    # compile=True / False as the engine's entry points take them (and the words)
    from pipeline.runner.driver import options_from

    problem = Problem(fn=torch.sin, x=torch.zeros(3))
    assert options_from(problem, {"compile": True})[0].compile == "on"
    assert options_from(problem, {"compile": False})[0].compile == "off"
    with pytest.raises(JacpipeError, match="--compile must be auto, on or off, got 'yes'"):
        options_from(problem, {"compile": "yes"})[0].check()
