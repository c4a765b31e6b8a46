"""The higher-order kinds end to end: sharded, budgeted, resumed, compared, read back.

``laplacian`` / ``biharmonic`` / ``taylor`` (per point) and ``third`` through
``jacpipe run`` in process and on Ray, checked against nested ``torch.func``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline import JacpipeError, open_jacobian, read_jacobian
from pipeline.analysis.compare import compare
from pipeline.cli import app
from pipeline.maths import operators
from pipeline.problem.problem import build_problem

LOCAL = ["--executor", "local", "--no-progress"]
pytestmark = pytest.mark.slow  # end to end through the CLI: seconds each


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _table(out) -> object:
    return pq.read_table(str(out), columns=None)


def test_poisson_in_process_columns_manifest_compare_and_read(tmp_path):
    out = tmp_path / "poisson"
    res = invoke("run", "poisson", "-p", "points=60", "-p", "dim=2", "--shards", "3",
                 "--out", out, "--verify", *LOCAL)
    assert res.exit_code == 0, res.output
    assert "MATCH" in res.output
    table = pq.read_table(out / "part-00001.parquet")
    assert table.column_names == ["row", "point", "values", "value", "x"]
    np.testing.assert_array_equal(table.column("point").to_numpy(),
                                  table.column("row").to_numpy())
    doc = json.loads(invoke("inspect", out, "--json").stdout)
    assert doc["kind"] == "laplacian" and doc["full_shape"] == [60]
    assert doc["operator"]["options"] == {}
    problem = build_problem("poisson", {"points": 60, "dim": 2})
    lap = read_jacobian(out)
    assert lap.shape == (60,)
    ref = operators.point_reference_rows(problem, np.arange(60)).reshape(-1)
    np.testing.assert_allclose(lap, ref, rtol=1e-10, atol=1e-12)
    assert invoke("inspect", out, "--plot", tmp_path / "p.png").exit_code == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize("kind", ["biharmonic", "taylor"])
def test_kind_override_from_the_cli(tmp_path, kind):
    out = tmp_path / kind
    args = ["run", "poisson", "-p", "points=12", "-p", "dim=3", "--kind", kind, "--out", out,
            "--verify", *LOCAL]
    res = invoke(*args)
    if kind == "taylor":  # needs order and direction: a job sets them, --kind alone cannot
        assert res.exit_code == 2 and "needs operator options order" in res.output
        return
    assert res.exit_code == 0, res.output
    assert "MATCH" in res.output
    assert open_jacobian(out).manifest.kind == "biharmonic"


def test_stochastic_run_on_ray_is_the_same_for_any_number_of_shards(ray_session, tmp_path):
    params = ["-p", "points=30", "-p", "dim=12", "-p", "samples=8", "-p", "hidden=16"]
    for shards in (1, 3):
        res = invoke("run", "allen_cahn", *params, "--shards", shards, "--chunk-size", 5,
                     "--executor", "ray", "--out", tmp_path / f"s{shards}", "--no-progress")
        assert res.exit_code == 0, res.output
    one, three = (open_jacobian(tmp_path / f"s{s}") for s in (1, 3))
    assert [s.device for s in three.committed] == ["cpu"] * 3
    from pipeline.analysis.smoothing import read_column

    np.testing.assert_array_equal(one.read(), three.read())
    np.testing.assert_array_equal(read_column(one, "stderr"), read_column(three, "stderr"))
    assert three.manifest.fingerprint["operator"] == {"samples": 8, "seed": 0}
    assert three.manifest.part_schema().names == ["row", "point", "values", "value", "stderr"]
    report = compare(str(tmp_path / "s3"), job="allen_cahn")
    assert report.ok, report.extra
    assert "within 3 standard errors" in report.extra


def test_a_wrong_estimate_and_a_wrong_operator_are_mismatches(tmp_path, monkeypatch):
    real = operators._OPERATORS["laplacian"]

    def off(fn, pts, first, options):  # 1% off, or 4 standard errors off (an estimate)
        cols = real(fn, pts, first, options)
        if "stderr" in cols:
            return {**cols, "values": cols["values"] + 4 * cols["stderr"]}
        return {**cols, "values": cols["values"] * 1.01}

    monkeypatch.setitem(operators._OPERATORS, "laplacian", off)
    for job, params in (("poisson", ["-p", "points=20"]),
                        ("allen_cahn", ["-p", "points=40", "-p", "dim=6", "-p", "samples=64",
                                        "-p", "hidden=8"])):
        out = tmp_path / job
        assert invoke("run", job, *params, "--out", out, *LOCAL).exit_code == 0
        monkeypatch.setitem(operators._OPERATORS, "laplacian", real)
        res = invoke("compare", out)
        assert res.exit_code == 1 and "MISMATCH" in res.output, res.output
        monkeypatch.setitem(operators._OPERATORS, "laplacian", off)


def test_a_failed_run_resumes_bit_identical(tmp_path, monkeypatch):
    args = ["-p", "points=40", "-p", "dim=3", "--shards", "4", "--chunk-size", "4", *LOCAL]
    assert invoke("run", "poisson", *args, "--out", tmp_path / "whole").exit_code == 0
    real = operators.point_columns

    def dies(problem, start, stop, **kw):
        if start >= 20:
            raise RuntimeError("killed")
        yield from real(problem, start, stop, **kw)

    monkeypatch.setattr(operators, "point_columns", dies)
    from pipeline.maths import kinds

    for name in ("laplacian",):
        monkeypatch.setitem(kinds.KIND_MATHS, name, kinds.KIND_MATHS[name].__class__(
            **{**kinds.KIND_MATHS[name].__dict__, "columns": dies}))
    failed = invoke("run", "poisson", *args, "--out", tmp_path / "again")
    assert failed.exit_code == 1 and "killed" in failed.output
    monkeypatch.undo()
    resumed = invoke("run", "poisson", *args, "--out", tmp_path / "again")
    assert resumed.exit_code == 0 and "2 resumed" in resumed.output, resumed.output
    for i in range(4):
        a = pq.read_table(tmp_path / "whole" / f"part-0000{i}.parquet")
        b = pq.read_table(tmp_path / "again" / f"part-0000{i}.parquet")
        assert a.equals(b)


def test_a_small_memory_budget_gives_small_chunks_and_the_same_result(tmp_path):
    common = ["-p", "points=64", "-p", "dim=4", "-p", "hidden=32,32", "--shards", "1", *LOCAL]
    assert invoke("run", "poisson", *common, "--out", tmp_path / "big").exit_code == 0
    res = invoke("run", "poisson", *common, "--memory-budget", "1GiB", "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    big, small = open_jacobian(tmp_path / "big"), open_jacobian(tmp_path / "s")
    assert small.committed[0].chunk_size <= big.committed[0].chunk_size
    np.testing.assert_allclose(small.read(), big.read(), rtol=1e-12)


def test_third_derivatives_on_ray_read_back_symmetric_and_contract(ray_session, tmp_path):
    out = tmp_path / "lj"
    res = invoke("run", "lennard_jones", "-p", "atoms=4", "--shards", "3", "--executor", "ray",
                 "--out", out, "--verify", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "MATCH" in res.output
    problem = build_problem("lennard_jones", {"atoms": 4})
    ref = torch.func.jacrev(torch.func.jacrev(torch.func.jacrev(problem.fn)))(problem.x).numpy()
    tensor = read_jacobian(out)
    assert tensor.shape == (12, 12, 12)
    np.testing.assert_allclose(tensor, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    rows = read_jacobian(out, rows=[0, 5])
    np.testing.assert_allclose(rows, operators.third_reference(problem)[[0, 5]], rtol=1e-10,
                               atol=1e-10 * np.abs(ref).max())
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(12), rng.standard_normal(12)
    result = open_jacobian(out)
    np.testing.assert_allclose(result.contract(u, v), np.einsum("i,j,ijk->k", u, v, ref),
                               rtol=1e-9)
    np.testing.assert_allclose(result.contract(u), np.einsum("i,ijk->jk", u, ref), rtol=1e-9)
    with pytest.raises(JacpipeError, match="u and v need 12 entries"):
        result.contract(u[:3])


@pytest.mark.parametrize("args,match", [
    (["mlp", "-p", "n=4", "-p", "m=3", "--kind", "third"], "third kind needs a scalar fn"),
    (["mlp", "-p", "n=4", "-p", "m=3", "--kind", "laplacian"], r"points x of shape \(P, D\)"),
    (["allen_cahn", "-p", "points=4", "-p", "dim=3", "--kind", "taylor"],
     "samples needs a stochastic operator"),
    (["poisson", "-p", "points=4", "--method", "fwd"], "computed by Taylor mode"),
    (["poisson", "-p", "points=4", "--sparsity", "auto"], "sparsity patterns apply to"),
    (["poisson", "-p", "points=4", "--kind", "nope"], "--kind must be"),
])
def test_bad_requests_are_one_line_before_any_work(tmp_path, args, match):
    res = invoke("run", *args, "--out", tmp_path / "x", *LOCAL)
    assert res.exit_code == 2, res.output
    assert __import__("re").search(match, res.output), res.output
    assert "Traceback" not in res.output


def test_taylor_kind_on_ray_records_its_operator(ray_session, tmp_path):
    out = tmp_path / "t"
    res = invoke("run", "tests.userjobs:taylor_field", "-p", "order=5", "--shards", "2",
                 "--executor", "ray", "--out", out, "--verify", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "MATCH" in res.output
    result = open_jacobian(out)
    assert result.manifest.fingerprint["operator"] == {"direction": [1.0, -0.5, 0.25],
                                                        "order": 5}
    assert result.shape == (24, 2) and result.full_shape == (24, 2)
    problem = build_problem("tests.userjobs:taylor_field", {"order": 5})
    v = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    f = problem.fn
    for _ in range(5):  # five nested jvps: the reference the kind replaces
        f = (lambda g: lambda t: torch.func.jvp(g, (t,), (v,))[1])(f)
    ref = torch.stack([f(p) for p in problem.x]).numpy()
    np.testing.assert_allclose(read_jacobian(out), ref, rtol=1e-10, atol=1e-12)
    table = pq.read_table(out / "part-00000.parquet")
    assert table.column_names == ["row", "point", "values", "value", "x"]
