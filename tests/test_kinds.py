"""Hessian and per-sample (batched) kinds, and their jobs, against torch's references.

Every new kind and job in float32 and float64, three ways: through the engine,
through Ray (``pipeline.run``), and through the CLI. References are torch's
one-process functions: ``torch.autograd.functional.hessian`` for Hessians and a
per-sample loop of ``torch.autograd.functional.jacobian`` for batched results.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.autograd.functional import hessian, jacobian
from typer.testing import CliRunner

from pipeline import JacpipeError, read_jacobian
from pipeline.analysis.compare import compare, sample_rows
from pipeline.cli import app
from pipeline.maths.engine import batched_rows, hessian_rows, iter_batched_rows, iter_hessian_rows
from pipeline.problem.problem import build_problem
from pipeline.runner.driver import RunOptions, run
from tests.manifests import read_doc

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


# ---------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("job", sorted(HESSIAN_JOBS))
@pytest.mark.parametrize("method", ["rev", "fwd", "auto"])
def test_hessian_jobs_match_autograd_and_func_hessian(job, dtype, method):
    problem = build_problem(job, {**HESSIAN_JOBS[job], "dtype": dtype})
    ref = hessian_reference(problem)
    n = ref.shape[0]
    bounds = [0, 5, 5, 13, n]  # uneven shards, one empty
    got = torch.cat([hessian_rows(problem.fn, problem.x, a, b, chunk_size=4, method=method)
                     for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    assert_close(got, ref, dtype)
    flat = problem.x.reshape(-1)
    func_ref = torch.func.hessian(lambda t: problem.fn(t.reshape(problem.x.shape)))(flat)
    assert_close(got, func_ref, dtype)


def test_rosenbrock_hessian_is_the_analytic_tridiagonal():
    problem = build_problem("rosenbrock", {"n": 40, "pattern": True})
    x = problem.x
    got = hessian_rows(problem.fn, x, 0, 40, chunk_size=16)
    diag = torch.zeros_like(x)
    diag[:-1] += 1200 * x[:-1] ** 2 - 400 * x[1:] + 2
    diag[1:] += 200
    ref = torch.diag(diag) + torch.diag(-400 * x[:-1], 1) + torch.diag(-400 * x[:-1], -1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-9)
    pattern = torch.from_numpy(problem.sparsity.toarray())
    assert pattern.dtype == torch.bool and torch.equal(pattern, got != 0)
    assert build_problem("rosenbrock", {"n": 40}).sparsity is None  # default: no pattern


def test_trajectory_pattern_covers_the_hessian_and_obstacles_are_active():
    problem = build_problem("trajectory", {"waypoints": 12, "pattern": True})
    h = hessian_reference(problem)
    pattern = torch.from_numpy(problem.sparsity.toarray())
    assert h.shape == (36, 36) and not h[~pattern].any()
    assert (h[pattern] != 0).float().mean() > 0.9  # the pattern is tight
    # The obstacle barrier couples x, y, z of a waypoint: off-diagonal 3x3 entries.
    blocks = h.reshape(12, 3, 12, 3).diagonal(dim1=0, dim2=2)  # (3, 3, 12)
    assert (blocks[0, 1].abs() > 1e-3).any()


def test_hessian_methods_and_ranges():
    problem = build_problem("rosenbrock", {"n": 10})
    starts = [a for a, _ in iter_hessian_rows(problem.fn, problem.x, 1, 10, chunk_size=4)]
    assert starts == [1, 5, 9]
    assert hessian_rows(problem.fn, problem.x, 3, 3).shape == (0, 10)
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_rows(problem.fn, problem.x, 0, 3, method="sideways")
    with pytest.raises(ValueError, match="outside"):
        hessian_rows(problem.fn, problem.x, 0, 11)


def test_benchmark_hand_derived_hessian_is_the_hessian():
    from benchmarks.batched_hessian import hand_hessian, hessian_problem, two_product_rows

    f, x, w = hessian_problem(40, "float64")
    ref = hessian(f, x)
    torch.testing.assert_close(hand_hessian(x, w), ref, rtol=1e-12, atol=1e-12)
    # The benchmark's floor of row methods: the same matrix, blocks that do not divide n.
    torch.testing.assert_close(two_product_rows(x, w, 16), ref, rtol=1e-12, atol=1e-12)
    for method in ("rev", "fwd"):
        torch.testing.assert_close(hessian_rows(f, x, 0, 40, chunk_size=16, method=method),
                                   ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("job", sorted(BATCHED_JOBS))
@pytest.mark.parametrize("method", ["rev", "fwd"])
def test_batched_jobs_match_the_per_sample_loop(job, dtype, method):
    problem = build_problem(job, {**BATCHED_JOBS[job], "dtype": dtype})
    ref = batched_reference(problem)  # (B, m, n)
    b, m, n = ref.shape
    flat_ref = ref.reshape(b * m, n)
    # Shards whose boundaries cut samples (m + 3, ...) and fall on them (2m).
    for bounds in ([0, b * m], [0, m + 3, 2 * m, 2 * m + 1, b * m], [2, 5]):
        parts = [batched_rows(problem.fn, problem.x, a, z, chunk_size=2 * max(m, n),
                              method=method)
                 for a, z in zip(bounds[:-1], bounds[1:], strict=True)]
        assert_close(torch.cat(parts), flat_ref[bounds[0]:bounds[-1]], dtype)
    vmapped = torch.func.vmap(torch.func.jacrev(problem.fn))(problem.x).reshape(b, m, n)
    assert_close(vmapped, ref, dtype)


def test_batched_chunks_are_counted_in_whole_samples():
    problem = build_problem("robot_arm", {"batch": 10})  # m = 12 rows, n = 6 columns
    fn, xs = problem.fn, problem.x

    def blocks(start, stop, chunk, method):
        return [(a, len(blk)) for a, blk in iter_batched_rows(
            fn, xs, start, stop, chunk_size=chunk, method=method)]

    # rev: 30 cotangents -> 2 samples (24 rows) per pass; the cut samples 0 and 8
    # go alone: rows 5..12 of sample 0, then whole samples 1..7, then 96..100.
    assert blocks(5, 100, 30, "rev") == [(5, 7), (12, 24), (36, 24), (60, 24), (84, 12),
                                         (96, 4)]
    # fwd: 30 tangents -> 5 samples (n = 6 JVPs each) per pass.
    assert blocks(0, 120, 30, "fwd") == [(0, 60), (60, 60)]
    # A sample larger than one chunk: its rows in chunks, never over the budget.
    small = blocks(0, 36, 5, "rev")
    assert max(r for _, r in small) <= 5 and sum(r for _, r in small) == 36
    ref = batched_reference(problem).reshape(120, 6)
    torch.testing.assert_close(batched_rows(fn, xs, 7, 31, chunk_size=5), ref[7:31])
    assert batched_rows(fn, xs, 12, 12).shape == (0, 6)
    with pytest.raises(ValueError, match="method must be one of"):
        batched_rows(fn, xs, 0, 3, method="sideways")


# ---------------------------------------------------------------------------
# Through Ray
# ---------------------------------------------------------------------------


def run_job(tmp_path, job, params, **options):
    out = tmp_path / job
    params = [f"{k}={v}" for k, v in params.items()]
    run(RunOptions(job=job, params=params, out=str(out), progress=False, **options),
        echo=lambda _: None)
    return out


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
    # pattern and colour it: tests/test_sparsity_run.py)
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


def test_compare_samples_a_large_batch(ray_session, tmp_path, monkeypatch):
    import pipeline.analysis.compare as cmp

    out = run_job(tmp_path, "cnn", {"batch": 4, "channels": 2, "dtype": "float64"}, shards=2)
    monkeypatch.setattr(cmp, "MAX_FULL_SAMPLES", 3)  # 4 samples: too many for the loop
    report = compare(str(out), rtol=1e-10)
    assert report.ok and report.mode == "sampled" and report.rows_checked == 40


# ---------------------------------------------------------------------------
# Through the CLI
# ---------------------------------------------------------------------------

cli = CliRunner()


def invoke(*args):
    return cli.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("args", [
    ["rosenbrock", "-p", "n=50", "--shards", "3"],
    ["rosenbrock", "-p", "n=20", "-p", "pattern=true", "--dtype", "float32"],
    ["trajectory", "-p", "waypoints=10", "--dtype", "float32"],
    ["cnn", "-p", "batch=3", "-p", "channels=2", "--dtype", "float64"],
    ["cnn", "-p", "batch=2", "-p", "channels=2", "--rows-per-shard", "7"],
    ["robot_arm", "-p", "batch=20", "--rows-per-shard", "7", "--dtype", "float32"],
])
def test_every_new_job_runs_and_verifies_through_the_cli(ray_session, tmp_path, args):
    result = invoke("run", *args, "--out", tmp_path / "o", "--verify")
    assert result.exit_code == 0, result.output
    assert "MATCH" in result.output and "MISMATCH" not in result.output
    kind = "hessian" if args[0] in HESSIAN_JOBS else "batched"
    assert ("symmetry" in result.output) == (kind == "hessian")
    info = json.loads(invoke("compare", tmp_path / "o", "--rows", 5, "--json").output)
    assert info["ok"] and info["mode"] == "sampled" and info["rows_checked"] == 5
    assert (info["symmetry_error"] is not None) == (kind == "hessian")


def test_new_jobs_are_listed_with_a_description():
    listing = {item["job"]: item for item in json.loads(invoke("jobs", "--json").output)}
    for job in ("cnn", "rosenbrock", "trajectory"):
        assert listing[job]["doc"] and "dtype" in listing[job]["params"]
    assert listing["rosenbrock"]["params"]["pattern"] is False
