"""The Parquet format of DESIGN.md: schema, metadata, writer settings, readers."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import JacpipeError
from pipeline.store.manifest import Manifest
from pipeline.store.parts import PartWriter, dense_schema
from pipeline.store.reader import open_jacobian, read_jacobian
from pipeline.store.storage import Storage


def write_result(tmp_path, matrix, bounds, *, dtype="float64", group_rows=4):
    storage = Storage(str(tmp_path))
    n = matrix.shape[1]
    shards = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        w = PartWriter(storage, f"part-{i:05d}.parquet", dense_schema(n, dtype),
                       {"job": "test", "shard": {"index": i, "start": a, "stop": b}},
                       group_rows=group_rows)
        for c in range(a, b, 3):  # blocks of 3 rows, groups of `group_rows`
            w.write(c, matrix[c:min(c + 3, b)])
        info = w.commit()
        shards.append({"index": i, "start": a, "stop": b, "file": info.file, "rows": info.rows,
                       "checksum": info.checksum, "bytes": info.bytes, "nan": info.nan,
                       "inf": info.inf})
    manifest = {
        "format_version": 1, "job": "test", "params": {}, "kind": "jacobian",
        "shapes": {"kind": "jacobian", "in_shape": [n], "out_shape": [matrix.shape[0]],
                   "batch": None, "dtype": dtype},
        "dtype": dtype, "plan": [[a, b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
        "shards": shards, "status": "complete",
    }
    Manifest.from_json(manifest).write(storage)
    return manifest


@pytest.fixture
def matrix():
    return np.random.default_rng(0).standard_normal((23, 7))


def test_round_trip_and_row_selection(tmp_path, matrix):
    write_result(tmp_path, matrix, [0, 10, 17, 23])
    np.testing.assert_array_equal(read_jacobian(tmp_path), matrix)
    np.testing.assert_array_equal(read_jacobian(tmp_path, rows=[22, 0, 11]), matrix[[22, 0, 11]])
    t = read_jacobian(tmp_path, as_="torch")
    assert tuple(t.shape) == (23, 7) and str(t.dtype) == "torch.float64"
    blocks = list(open_jacobian(tmp_path).iter_blocks())
    assert [int(r[0]) for r, _ in blocks] == [0, 4, 8, 10, 14, 17, 21]  # row groups of 4
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), matrix)


def test_schema_metadata_and_writer_settings(tmp_path, matrix):
    write_result(tmp_path, matrix, [0, 23], dtype="float32")
    f = tmp_path / "part-00000.parquet"
    schema = pq.read_schema(f)
    assert schema.field("row").type == pa.int64()
    element = pa.field("element", pa.float32(), nullable=False)  # issue 16: no null levels
    assert schema.field("values").type == pa.list_(element, 7)
    meta = json.loads(schema.metadata[b"jacpipe"])
    assert meta["shard"] == {"index": 0, "start": 0, "stop": 23}
    md = pq.ParquetFile(f).metadata
    col_row, col_val = md.row_group(0).column(0), md.row_group(0).column(1)
    assert col_row.compression == "ZSTD" and col_val.compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" in col_val.encodings
    assert col_row.statistics is not None and col_row.statistics.has_min_max
    assert col_val.statistics is None or not col_val.statistics.has_min_max


def test_readable_by_pyarrow_dataset_and_pandas(tmp_path, matrix):
    write_result(tmp_path, matrix, [0, 12, 23])
    (tmp_path / ".part-00001.deadbeef.tmp").write_bytes(b"half a file from a crash")
    table = ds.dataset(tmp_path, format="parquet").to_table()
    assert sorted(table.column("row").to_pylist()) == list(range(23))
    df = pq.read_table(tmp_path / "part-00001.parquet").to_pandas()
    assert list(df.columns) == ["row", "values"]
    np.testing.assert_array_equal(np.stack(df["values"].to_numpy()), matrix[12:23])


def test_readers_trust_committed_shards_only(tmp_path, matrix):
    manifest = write_result(tmp_path, matrix, [0, 12, 23])
    manifest["shards"] = manifest["shards"][:1]
    Manifest.from_json(manifest).write(Storage(str(tmp_path)))
    with pytest.raises(JacpipeError, match="shard 1 .*not committed"):
        read_jacobian(tmp_path)
    np.testing.assert_array_equal(read_jacobian(tmp_path, rows=[3, 5]), matrix[[3, 5]])


def test_corrupt_part_is_named(tmp_path, matrix):
    write_result(tmp_path, matrix, [0, 12, 23])
    f = tmp_path / "part-00001.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    problems = open_jacobian(tmp_path).check()
    assert [(p.index, p.reason) for p in problems] == [(1, "corrupt (checksum mismatch)")]
    with pytest.raises(JacpipeError, match="part-00001.parquet"):
        read_jacobian(tmp_path)


def test_not_a_result(tmp_path):
    with pytest.raises(JacpipeError, match="not a jacpipe result"):
        open_jacobian(tmp_path)
    (tmp_path / "_manifest.json").write_text('{"hello": 1}')
    with pytest.raises(JacpipeError, match="not a jacpipe manifest"):
        open_jacobian(tmp_path)
    (tmp_path / "_manifest.json").unlink()
    pq.write_table(pa.table({"hello": [1]}), tmp_path / "_manifest.parquet")
    with pytest.raises(JacpipeError, match="_manifest.parquet is corrupt .*without"):
        open_jacobian(tmp_path)


def test_shard_spec_and_result_round_trip_through_json():
    from pipeline.core.shapes import Shapes
    from pipeline.core.shard import ShardResult, ShardSpec

    spec = ShardSpec(job="mlp", params={"n": 4}, fingerprint={"x": "y"},
                     shapes=Shapes("batched", (3,), (2,), 5, "float64"), index=1, start=2,
                     stop=8, out="/o", method="rev", layout="dense", memory_budget=2**20,
                     threads=1, device="cpu", device_param=True, run_id="r", group_rows=4)
    assert ShardSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec.part_meta()["shard"] == {"index": 1, "start": 2, "stop": 8}
    result = ShardResult(index=1, start=2, stop=8, file="part-00001.parquet", rows=6,
                         checksum="0" * 64, gpu_ids=["0"], attempt=2)
    assert ShardResult.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_manifest_validates_itself(tmp_path, matrix):
    doc = write_result(tmp_path, matrix, [0, 12, 23])
    man = Manifest.read(Storage(str(tmp_path)))
    assert [s.index for s in man.committed] == [0, 1] and man.dtype == "float64"
    assert Manifest.from_json(man.to_json()).to_json() == man.to_json()
    for edit, match in [
        (lambda d: d["plan"].__setitem__(1, [12, 22]), "plan covers 22 rows"),
        (lambda d: d["shards"][1].__setitem__("file", "part-00009.parquet"), "does not match"),
        (lambda d: d.__setitem__("layout", "diagonal"), "unknown layout"),
    ]:
        bad = json.loads(json.dumps(doc))
        edit(bad)
        with pytest.raises(ValueError, match=match):
            Manifest.from_json(bad)


def test_results_with_the_old_json_manifest_still_read_and_resume(tmp_path):
    """Before the manifest moved into Parquet it was ``_manifest.json``: still read and resumed."""
    import polars as pl

    from pipeline.core.options import RunOptions
    from pipeline.runner import driver as runner
    from tests.manifests import read_doc

    out = tmp_path / "out"
    opts = RunOptions(job="mlp", params=["n=12", "m=9", "hidden=4"], shards=3, out=str(out),
                      executor="local", progress=False)
    runner.run(opts, echo=lambda _: None)
    new = read_jacobian(out)
    assert pl.read_parquet(out).height == 9 and sorted(os.listdir(out)) == [
        "_manifest.parquet", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    doc = read_doc(out)
    (out / "_manifest.json").write_text(json.dumps(doc, indent=1))
    (out / "_manifest.parquet").unlink()
    np.testing.assert_array_equal(read_jacobian(out), new)
    assert open_jacobian(out).manifest.status == "complete"
    # An interrupted old result: shard 1 was never committed.
    doc["shards"] = [s for s in doc["shards"] if s["index"] != 1]
    doc["status"] = "interrupted"
    (out / "_manifest.json").write_text(json.dumps(doc, indent=1))
    lines: list[str] = []
    runner.run(opts, echo=lines.append)
    assert lines == ["resuming: 2 of 3 shards already committed"]
    assert not (out / "_manifest.json").exists()
    assert read_doc(out)["status"] == "complete"
    np.testing.assert_array_equal(read_jacobian(out), new)
