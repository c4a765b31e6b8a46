"""Sparse Jacobians by colouring, end to end: Ray, Parquet (sparse layout), compare, inspect."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from torch.autograd.functional import jacobian
from typer.testing import CliRunner

from pipeline import read_jacobian
from pipeline.cli import app
from pipeline.problem.problem import build_problem
from pipeline.sparse.compressed import banded_pattern
from tests.manifests import read_doc

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def dense_reference(job, params):
    problem = build_problem(job, params)
    return jacobian(problem.fn, problem.x).reshape(-1, problem.x.numel()).numpy()


@pytest.mark.parametrize("job,params,colors", [
    ("heat", {"N": 12}, 5),
    ("banded", {"n": 300, "k": 2}, 5),
    ("brusselator", {"N": 8}, None),
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sparse_jobs_equal_the_dense_jacobian(ray_session, tmp_path, job, params, colors, dtype):
    out = tmp_path / job
    args = [f"{k}={v}" for k, v in params.items()]
    result = invoke("run", job, *sum((["-p", a] for a in args), []), "--dtype", dtype,
                    "--shards", 3, "--out", out, "--verify")
    assert result.exit_code == 0, result.output
    man = read_doc(out)
    assert man["layout"] == "sparse" and man["method"] == "sparse"
    if colors is not None:
        assert man["coloring"]["num_colors"] == colors
    got = read_jacobian(out)
    assert sp.issparse(got)
    ref = dense_reference(job, {**params, "dtype": dtype})
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got.toarray(), ref, **tol)
    assert got.nnz == man["coloring"]["nnz"]
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.field("cols").type == pa.list_(pa.int64())
    info = json.loads(invoke("inspect", out, "--json").output)
    assert info["layout"] == "sparse" and info["colors"] == man["coloring"]["num_colors"]
    assert info["density"] == pytest.approx(man["coloring"]["nnz"] / ref.size)


def test_a_too_sparse_pattern_is_caught_by_compare(ray_session, tmp_path):
    # banded with k=2 has 5 bands; claim only 3.
    pattern = tmp_path / "tri.npz"
    sp.save_npz(pattern, banded_pattern(200, 3).astype(np.float64))
    out = tmp_path / "b"
    result = invoke("run", "banded", "-p", "n=200", "--sparsity", pattern, "--out", out)
    assert result.exit_code == 0, result.output
    cmp = invoke("compare", out, "--rows", 20)
    assert cmp.exit_code == 1
    assert "too sparse" in cmp.output and "outside" in cmp.output
    report = json.loads(invoke("compare", out, "--rows", 20, "--json").output)
    assert not report["ok"] and any("J[" in p for p in report["problems"])


def test_parquet_pattern_file_and_dense_override(ray_session, tmp_path):
    pat = banded_pattern(150, 5).tocoo()
    table = pa.table({"row": pat.row.astype(np.int64), "col": pat.col.astype(np.int64)})
    table = table.replace_schema_metadata({"shape": "150,150"})
    pq.write_table(table, tmp_path / "p.parquet")
    out = tmp_path / "o"
    result = invoke("run", "banded", "-p", "n=150", "--sparsity", tmp_path / "p.parquet",
                    "--out", out, "--verify")
    assert result.exit_code == 0, result.output
    dense = tmp_path / "d"
    result = invoke("run", "banded", "-p", "n=150", "--method", "rev", "--out", dense)
    assert result.exit_code == 0
    assert read_doc(dense)["layout"] == "dense"
    np.testing.assert_allclose(read_jacobian(out).toarray(), read_jacobian(dense), rtol=1e-12)


@pytest.mark.parametrize("args,match", [
    (["run", "mlp", "-p", "n=20", "-p", "m=20", "--method", "sparse"], "no sparsity pattern"),
    (["run", "banded", "--sparsity", "missing.npz"], "no such file"),
    (["run", "banded", "-p", "n=50", "--sparsity", "__shape__"], "expected (50, 50)"),
])
def test_sparse_user_errors(ray_session, tmp_path, args, match):
    if "__shape__" in args:
        sp.save_npz(tmp_path / "wrong.npz", banded_pattern(60, 3).astype(np.float64))
        args = [str(tmp_path / "wrong.npz") if a == "__shape__" else a for a in args]
    result = invoke(*args, "--out", tmp_path / "o")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert match in result.output
