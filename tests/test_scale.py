"""Issue 16: pipelined workers, parallel encoding, fast reads, results as linear operators."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.shard import ShardSpec
from pipeline.problem.problem import build_problem, fingerprint, validate
from pipeline.runner.worker import compute_shard
from pipeline.store.manifest import Manifest
from pipeline.store.parts import PartWriter, dense_schema
from pipeline.store.reader import open_jacobian, read_jacobian
from pipeline.store.storage import Storage


def _specs(out, job, params, *, shards=2, threads=1, group_rows=16, chunk=7, **extra):
    problem = build_problem(job, params)
    shapes = validate(problem)
    fp = fingerprint(problem, shapes)
    total = shapes.total_rows
    cuts = np.linspace(0, total, shards + 1).astype(int)
    specs = [
        ShardSpec(job=job, params=params, fingerprint=fp, shapes=shapes, index=i,
                  start=int(a), stop=int(b), out=str(out), method="rev", layout="dense",
                  memory_budget=2**30, threads=threads, device="cpu", device_param=False,
                  run_id="r", group_rows=group_rows, chunk_size=chunk, **extra)
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))
    ]
    return problem, shapes, specs


def _finish(out, shapes, results, layout="dense"):
    Manifest.from_json({
        "format_version": 1, "kind": shapes.kind, "shapes": shapes.to_json(),
        "dtype": shapes.dtype, "layout": layout,
        "plan": [[r.start, r.stop] for r in results],
        "shards": [r.to_json() for r in results], "status": "complete",
    }).write(Storage(str(out)))


def _run(out, job, params, **kw):
    os.makedirs(out, exist_ok=True)
    problem, shapes, specs = _specs(out, job, params, **kw)
    results = [compute_shard(s) for s in specs]
    _finish(out, shapes, results)
    return problem, shapes, results


MLP = {"n": 40, "m": 50, "hidden": 16}


def test_pipelined_and_serial_writers_give_bitwise_equal_parts(tmp_path):
    _, shapes, specs = _specs(tmp_path / "a", "mlp", MLP)
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    piped = [compute_shard(s) for s in specs]
    serial = [compute_shard(s.__class__(**{**s.__dict__, "out": str(tmp_path / "b")}),
                            pipelined=False) for s in specs]
    assert [r.checksum for r in piped] == [r.checksum for r in serial]
    for r in piped:
        assert r.compute_seconds > 0 and r.write_seconds > 0
        assert (tmp_path / "a" / r.file).read_bytes() == (tmp_path / "b" / r.file).read_bytes()
    _finish(tmp_path / "a", shapes, piped)
    problem = build_problem("mlp", MLP)
    import torch

    want = torch.func.jacrev(problem.fn)(problem.x).reshape(shapes.m, shapes.n).numpy()
    np.testing.assert_allclose(read_jacobian(tmp_path / "a"), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compression", ["zstd", "zstd:1", "lz4", "none"])
def test_one_and_several_encoder_threads_give_bitwise_equal_parts(tmp_path, compression):
    data = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    sums = []
    for encoders in (1, 2, 3):
        w = PartWriter(Storage(str(tmp_path)), f"p{encoders}.parquet", dense_schema(64, "float32"),
                       {"k": 1}, group_rows=32, compression=compression, encoders=encoders)
        for a in range(0, 300, 45):
            w.write(a, data[a : a + 45])
        sums.append(w.commit().checksum)
        table = pq.read_table(tmp_path / f"p{encoders}.parquet")
        got = table.column("values").combine_chunks().flatten().to_numpy().reshape(-1, 64)
        assert np.array_equal(got, data)
        assert table.column("row").to_pylist() == list(range(300))
        pf = pq.ParquetFile(tmp_path / f"p{encoders}.parquet")
        assert pf.num_row_groups == 10 and pf.metadata.row_group(3).column(0).statistics.min == 96
        codec = pf.metadata.row_group(0).column(1).compression
        assert codec == {"none": "UNCOMPRESSED", "lz4": "LZ4"}.get(compression, "ZSTD")
    assert len(set(sums)) == 1
    # The same through compute_shard: threads=3 means 2 encoder threads.
    _, _, specs1 = _specs(tmp_path / "t1", "mlp", MLP, shards=1, threads=1)
    _, _, specs3 = _specs(tmp_path / "t3", "mlp", MLP, shards=1, threads=3)
    os.makedirs(tmp_path / "t1")
    os.makedirs(tmp_path / "t3")
    assert compute_shard(specs1[0]).checksum == compute_shard(specs3[0]).checksum


@pytest.mark.parametrize(("job", "params", "group", "chunk", "first"), [
    ("mlp", MLP, 16, 16, 4),  # 4 pieces of 4 rows in a 16-row group
    ("robot_arm", {"batch": 9}, 64, 48, 24),  # a 32-row piece ends at sample 2 (m = 12)
])
def test_the_first_block_is_one_piece_and_the_rest_keep_their_chunk(
    tmp_path, monkeypatch, job, params, group, chunk, first
):
    """worker NOTE: [A small first block]: same bytes, the writer starts one piece in."""
    from pipeline.runner import worker
    from pipeline.store import parts

    monkeypatch.setattr(parts, "PIECE_BYTES", 64 if job == "mlp" else 2048)
    problem, shapes, specs = _specs(tmp_path / "a", job, params, shards=1, group_rows=group,
                                    chunk=chunk)
    spec = specs[0]
    blocks = []
    real = PartWriter.write

    def spy(self, a, block, **kw):
        blocks.append((a, len(block)))
        return real(self, a, block, **kw)

    monkeypatch.setattr(PartWriter, "write", spy)
    os.makedirs(tmp_path / "a")
    ramped = compute_shard(spec)
    assert blocks[0] == (0, first)
    sizes = [b for _, b in blocks[1:]]
    assert sum(sizes) == spec.rows - first and max(sizes) == chunk
    _finish(tmp_path / "a", shapes, [ramped])
    import torch

    if job == "mlp":
        want = torch.func.jacrev(problem.fn)(problem.x).reshape(shapes.m, shapes.n)
    else:
        want = torch.func.vmap(torch.func.jacrev(problem.fn))(problem.x).reshape(-1, shapes.n)
    got = read_jacobian(tmp_path / "a").reshape(-1, shapes.n)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    # Without the ramp: other blocks, the same row groups and values (to rounding:
    # a vectorised pass over other rows may round the last bit differently).
    blocks.clear()
    monkeypatch.setattr(worker, "_first_block_end", lambda spec, chunk: spec.start)
    os.makedirs(tmp_path / "b")
    plain = compute_shard(spec.__class__(**{**spec.__dict__, "out": str(tmp_path / "b")}))
    assert blocks[0] == (0, chunk)
    _finish(tmp_path / "b", shapes, [plain])
    groups = [pq.ParquetFile(tmp_path / d / ramped.file).metadata.num_row_groups for d in "ab"]
    piece = 4 if job == "mlp" else 32
    assert groups[0] == groups[1] == -(-spec.rows // piece)
    np.testing.assert_allclose(read_jacobian(tmp_path / "b"), read_jacobian(tmp_path / "a"),
                               rtol=1e-6, atol=1e-7)


def test_a_failing_writer_thread_aborts_the_shard_cleanly(tmp_path, monkeypatch):
    _, _, specs = _specs(tmp_path, "mlp", MLP, shards=1)
    os.makedirs(tmp_path, exist_ok=True)

    calls = {"n": 0}
    real = PartWriter.write

    def broken(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (injected)")
        return real(self, *a, **kw)

    monkeypatch.setattr(PartWriter, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        compute_shard(specs[0])
    left = [f for f in os.listdir(tmp_path) if "part" in f]
    assert left == []  # no part, no temp file
    assert not (tmp_path / "_manifest.parquet").exists()
    monkeypatch.setattr(PartWriter, "write", real)
    assert compute_shard(specs[0]).rows == specs[0].rows  # the retry works


def test_a_failing_compute_stops_the_writer_thread(tmp_path, monkeypatch):
    import threading

    from pipeline.runner import worker

    _, _, specs = _specs(tmp_path, "mlp", MLP, shards=1)
    os.makedirs(tmp_path, exist_ok=True)
    real = worker.iter_rows

    def broken(*a, **kw):
        for i, item in enumerate(real(*a, **kw)):
            if i == 2:
                raise RuntimeError("NaN in the model (injected)")
            yield item

    monkeypatch.setattr(worker, "iter_rows", broken)
    with pytest.raises(RuntimeError, match="injected"):
        compute_shard(specs[0])
    assert [f for f in os.listdir(tmp_path) if "part" in f] == []
    assert not any(t.name == "jacpipe-writer" for t in threading.enumerate())


def test_old_format_1_parts_still_read(tmp_path):
    """A part written the old way (pyarrow's own writer, nullable elements) still reads."""
    rng = np.random.default_rng(1)
    data = rng.standard_normal((30, 7)).astype(np.float32)
    from pipeline.core.shapes import Shapes

    shapes = Shapes("jacobian", (7,), (30,), None, "float32")
    schema = pa.schema([pa.field("row", pa.int64(), nullable=False),
                        pa.field("values", pa.list_(pa.float32(), 7), nullable=False)])
    entries = []
    for i, (a, b) in enumerate([(0, 13), (13, 30)]):
        values = pa.FixedSizeListArray.from_arrays(pa.array(data[a:b].ravel()), 7)
        meta = {b"jacpipe": json.dumps({"format_version": 1})}
        table = pa.table({"row": np.arange(a, b), "values": values},
                         schema=schema.with_metadata(meta))
        path = tmp_path / f"part-{i:05d}.parquet"
        pq.write_table(table, path, row_group_size=5, compression="zstd", use_dictionary=False,
                       write_statistics=["row"],
                       column_encoding={"row": "PLAIN", "values.list.element": "BYTE_STREAM_SPLIT"})
        import hashlib

        entries.append({"index": i, "start": a, "stop": b, "file": path.name, "rows": b - a,
                        "checksum": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "bytes": path.stat().st_size, "seconds": 0.1})
    Manifest.from_json({"format_version": 1, "kind": "jacobian", "shapes": shapes.to_json(),
                        "dtype": "float32", "plan": [[0, 13], [13, 30]], "shards": entries,
                        "status": "complete"}).write(Storage(str(tmp_path)))
    assert np.array_equal(read_jacobian(tmp_path), data)
    assert np.array_equal(read_jacobian(tmp_path, rows=[29, 3, 14]), data[[29, 3, 14]])
    res = open_jacobian(tmp_path)
    assert res.committed[0].compute_seconds == 0.0  # old manifests: defaults
    assert np.array_equal(np.concatenate([b for _, b in res.iter_blocks()]), data)
    v = rng.standard_normal(7)
    np.testing.assert_allclose(res.as_linear_operator().matvec(v), data @ v, rtol=1e-5)


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


def test_compression_option_is_checked_and_planned():
    from pipeline.core.errors import JacpipeError
    from pipeline.core.options import RunOptions
    from pipeline.core.shapes import Shapes
    from pipeline.runner.plan import Resources, make_plan, parse_compression

    assert parse_compression("zstd") == ("zstd", None)
    assert parse_compression("zstd:3") == ("zstd", 3)
    for bad in ("brotli", "lz4:3", "zstd:x", "zstd:99"):
        with pytest.raises(JacpipeError, match="--compression"):
            RunOptions(job="j", compression=bad).check()
    shapes = Shapes("jacobian", (10,), (10,), None, "float32")
    plan = make_plan(shapes, RunOptions(job="j", compression="lz4"),
                     Resources(cpus=2, node_memory=8 * 2**30, node_cpus=2))
    assert plan.compression == "lz4"


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


def test_groups_are_encoded_in_pieces_that_do_not_depend_on_the_thread_count(
    tmp_path, monkeypatch
):
    """NOTE: [Encoding pieces]: a 32-row group of 256-byte rows in 1 KiB pieces is 4 row groups."""
    from pipeline.store import parts

    monkeypatch.setattr(parts, "PIECE_BYTES", 1024)
    data = np.random.default_rng(1).standard_normal((300, 64)).astype(np.float32)
    sums = set()
    for encoders in (1, 2, 3):
        name = f"q{encoders}.parquet"
        w = PartWriter(Storage(str(tmp_path)), name, dense_schema(64, "float32"), {},
                       group_rows=32, encoders=encoders)
        for a in range(0, 300, 45):
            w.write(a, data[a : a + 45])
        sums.add(w.commit().checksum)
        pf = pq.ParquetFile(tmp_path / name)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        assert sizes == [8] * 36 + [8, 4]  # 9 groups of 32 in 4 pieces, then 12 = 8 + 4
        got = pf.read().column("values").combine_chunks().flatten().to_numpy().reshape(-1, 64)
        assert np.array_equal(got, data)
    assert len(sums) == 1
    # Variable-length rows (the sparse layout) are never cut.
    assert parts._pieces(parts.sparse_schema("float32"), 10**6) == 1
