"""``pipeline.store.linop``: a result as a LinearOperator."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.problem.problem import build_problem
from pipeline.store.parts import PartWriter
from pipeline.store.reader import open_jacobian, read_jacobian
from pipeline.store.storage import Storage
from tests.runner.shards import MLP, _finish, _run


def _check_operator(op, J, rng):
    m, n = J.shape
    assert op.shape == (m, n)
    v, u = rng.standard_normal(n), rng.standard_normal(m)
    V, U = rng.standard_normal((n, 3)), rng.standard_normal((m, 4))
    tol = {"rtol": 1e-4, "atol": 1e-4}
    np.testing.assert_allclose(op.matvec(v), J @ v, **tol)
    np.testing.assert_allclose(op.rmatvec(u), J.T @ u, **tol)
    np.testing.assert_allclose(op.matmat(V), J @ V, **tol)
    np.testing.assert_allclose(op.rmatmat(U), J.T @ U, **tol)
    np.testing.assert_allclose(op.H @ u, J.T @ u, **tol)
    np.testing.assert_allclose(op @ v, J @ v, **tol)


def test_linear_operator_of_a_dense_result(tmp_path):
    _run(tmp_path, "mlp", MLP, shards=3, group_rows=8)
    J = read_jacobian(tmp_path)
    rng = np.random.default_rng(0)
    _check_operator(open_jacobian(tmp_path).as_linear_operator(), J, rng)
    op64 = open_jacobian(tmp_path).as_linear_operator(dtype="float64", verify=True)
    v = rng.standard_normal(J.shape[1])
    np.testing.assert_allclose(op64.matvec(v), J.astype(np.float64) @ v, rtol=1e-12)


def test_linear_operator_of_a_batched_result(tmp_path):
    params = {"batch": 6, "dtype": "float64"}
    problem = build_problem("cnn", params)
    if problem.kind != "batched":
        pytest.skip("cnn job is not batched")
    _run(tmp_path, "cnn", params, shards=2, group_rows=5, chunk=4)
    res = open_jacobian(tmp_path)
    J = res.read().reshape(res.shape)
    _check_operator(res.as_linear_operator(), J, np.random.default_rng(1))


def test_linear_operator_of_a_sparse_result(tmp_path):
    import scipy.sparse as sp

    rng = np.random.default_rng(2)
    mat = sp.random(40, 30, density=0.1, random_state=3, format="csr")
    from pipeline.core.shapes import Shapes
    from pipeline.core.shard import ShardResult
    from pipeline.store.parts import sparse_schema

    shapes = Shapes("jacobian", (30,), (40,), None, "float64")
    results = []
    for i, (a, b) in enumerate([(0, 25), (25, 40)]):
        w = PartWriter(Storage(str(tmp_path)), f"part-{i:05d}.parquet", sparse_schema("float64"),
                       {}, group_rows=10)
        piece = mat[a:b]
        w.write_sparse(np.arange(a, b), piece.indptr, piece.indices, piece.data)
        info = w.commit()
        results.append(ShardResult(index=i, start=a, stop=b, file=info.file, rows=info.rows,
                                   checksum=info.checksum, bytes=info.bytes))
    _finish(tmp_path, shapes, results, layout="sparse")
    res = open_jacobian(tmp_path)
    assert abs(res.read() - mat).max() == 0
    _check_operator(res.as_linear_operator(), mat.toarray(), rng)


def test_lsmr_gauss_newton_step_on_a_result(tmp_path):
    from scipy.sparse.linalg import lsmr

    _run(tmp_path, "mlp", {"n": 20, "m": 30, "hidden": 8, "dtype": "float64"}, shards=2)
    J = read_jacobian(tmp_path)
    r = np.random.default_rng(4).standard_normal(J.shape[0])
    step = lsmr(open_jacobian(tmp_path).as_linear_operator(), -r, atol=1e-12, btol=1e-12,
                maxiter=500)[0]
    want = np.linalg.lstsq(J, -r, rcond=None)[0]
    np.testing.assert_allclose(J @ step, J @ want, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_a_4000_by_4000_result_as_an_operator_and_svd(tmp_path):
    """The larger-than-RAM path at a size the suite affords (4,000 x 4,000; the 100,000 x
    100,000 case is ``python -m benchmarks.scale --huge``)."""
    from pipeline.analysis.inspection import svd_result
    from pipeline.analysis.svd import streamed_svd

    _run(tmp_path, "mlp", {"n": 4000, "m": 4000, "hidden": 16}, shards=2, threads=2,
         group_rows=512, chunk=256)
    res = open_jacobian(tmp_path)
    assert len(pq.ParquetFile(tmp_path / "part-00000.parquet").metadata.to_dict()
               ["row_groups"]) == 4
    J = read_jacobian(tmp_path, verify=False)
    v = np.random.default_rng(5).standard_normal(4000)
    np.testing.assert_allclose(res.as_linear_operator().matvec(v), J @ v, rtol=1e-4, atol=1e-4)
    got = svd_result(str(tmp_path), 3, power_iters=1)
    want = streamed_svd(lambda: iter([J]), 4000, 3, power_iters=1)
    np.testing.assert_allclose(got.s, want.s, rtol=1e-6)
