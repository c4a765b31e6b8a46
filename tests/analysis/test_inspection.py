"""Result analysis (issue 5): --fd, --plot, --svd and the Python API over a real run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.autograd.functional import jacobian
from typer.testing import CliRunner

from pipeline import open_jacobian, read_jacobian
from pipeline.cli import app
from pipeline.problem.problem import build_problem

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def mlp_out(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("an") / "mlp"
    result = invoke("run", "mlp", "-p", "n=90", "-p", "m=70", "-p", "hidden=80",
                    "-p", "dtype=float64", "--shards", 3, "--out", out)
    assert result.exit_code == 0, result.output
    problem = build_problem("mlp", {"n": 90, "m": 70, "hidden": 80, "dtype": "float64"})
    return out, jacobian(problem.fn, problem.x).numpy()


def test_fd_names_the_non_smooth_input_of_the_contact_job(ray_session, tmp_path):
    out = tmp_path / "contact"
    assert invoke("run", "contact", "--out", out).exit_code == 0
    result = invoke("compare", out, "--fd", "--json")
    report = json.loads(result.output)["fd"]  # one document: {"compare", "fd", "ok"}
    assert report["nonsmooth_inputs"] == [2]  # z = 0: the contact switches on
    assert report["disagreeing_columns"] == []
    assert all(c["h"] > 0 for c in report["checks"])
    table = invoke("compare", out, "--fd")
    assert "non-smooth at x along inputs 2" in table.output


def test_fd_reports_nothing_on_a_smooth_job(mlp_out):
    out, _ = mlp_out
    result = invoke("compare", out, "--fd", "--fd-columns", 6, "--json")
    assert result.exit_code == 0
    report = json.loads(result.output)["fd"]  # one document: {"compare", "fd", "ok"}
    assert report["nonsmooth_inputs"] == [] and report["ok"]
    assert len(report["checks"]) == 6


def test_svd_matches_numpy(mlp_out):
    out, ref = mlp_out
    info = json.loads(invoke("inspect", out, "--svd", 70, "--json").output)
    s = np.linalg.svd(ref, compute_uv=False)
    np.testing.assert_allclose(info["svd"]["singular_values"], s, rtol=1e-8)
    assert info["svd"]["condition_estimate"] == pytest.approx(s[0] / s[-1], rel=1e-6)
    top = json.loads(invoke("inspect", out, "--svd", 3, "--json").output)["svd"]
    # A random MLP's spectrum is flat, the hard case for range-finding: the
    # estimates are lower bounds within a few percent.
    est = np.array(top["singular_values"])
    assert np.all(est <= s[:3] * (1 + 1e-9)) and np.all(est >= 0.95 * s[:3])
    assert top["condition_estimate"] is None


def test_plot_writes_a_png(mlp_out, tmp_path):
    out, _ = mlp_out
    png = tmp_path / "J.png"
    result = invoke("inspect", out, "--plot", png)
    assert result.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    w, h = Image.open(png).size
    assert 400 < w < 3000 and 300 < h < 3000


def test_plot_into_a_missing_folder_is_refused_and_creates_nothing(mlp_out, tmp_path):
    """``--plot /nonexistent/dir/x.png`` used to create the folders (at the file-system root)."""
    out, _ = mlp_out
    target = tmp_path / "missing" / "dir" / "x.png"
    result = invoke("inspect", out, "--plot", target)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "the folder" in errors[0] and "does not exist" in errors[0], errors[0]
    assert not (tmp_path / "missing").exists()


def test_python_api_rows_and_formats(mlp_out):
    out, ref = mlp_out
    np.testing.assert_allclose(read_jacobian(out), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(read_jacobian(out, rows=[69, 3, 40]), ref[[69, 3, 40]],
                               rtol=1e-12, atol=1e-14)
    t = read_jacobian(out, rows=slice(10, 20), as_="torch")
    assert isinstance(t, torch.Tensor) and t.shape == (10, 90)
    csr = read_jacobian(out, as_="scipy")
    assert sp.issparse(csr) and csr.shape == (70, 90)
    res = open_jacobian(out)
    seen = np.concatenate([rows for rows, _ in res.iter_blocks()])
    assert np.array_equal(seen, np.arange(70))
    assert res.shape == (70, 90) and res.dtype == "float64"


def test_pandas_polars_duckdb_agree_with_read_jacobian(mlp_out):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    out, _ = mlp_out
    J = read_jacobian(out)
    expected = np.abs(J).max(axis=1)
    glob = f"{out}/*.parquet"  # the manifest is a Parquet file of no rows and the same schema

    # Every reader takes the folder itself (NOTE: [Manifest container]).
    assert pl.read_parquet(out).height == ds.dataset(out).count_rows() == J.shape[0]
    assert sorted(pl.read_parquet(out)["row"]) == list(range(J.shape[0]))
    assert duckdb.sql(f"SELECT count(*) FROM '{glob}'").fetchall() == [(J.shape[0],)]
    df = pd.read_parquet(out)
    df = df.sort_values("row")
    pandas_max = df["values"].map(lambda v: np.abs(v).max()).to_numpy()
    np.testing.assert_allclose(pandas_max, expected)

    pl_max = (pl.scan_parquet(out).select(
        pl.col("row"), pl.col("values").arr.eval(pl.element().abs()).arr.max().alias("m"))
        .sort("row").collect()["m"].to_numpy())
    np.testing.assert_allclose(pl_max, expected)

    con = duckdb.connect()
    rows = con.execute(
        f"SELECT row, list_max(list_transform(values, lambda x: abs(x))) FROM '{glob}' ORDER BY row"
    ).fetchall()
    np.testing.assert_allclose([r[1] for r in rows], expected)
    one = con.execute(f"SELECT values FROM '{glob}' WHERE row = 42").fetchone()[0]
    np.testing.assert_allclose(one, J[42])
