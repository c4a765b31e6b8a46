"""``pipeline.store.parts``: part files written and read back."""

from __future__ import annotations

import json

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
from tests.store.written import write_result


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


@pytest.mark.parametrize("compression", ["zstd", "zstd:3", "lz4", "snappy", "none"])
@pytest.mark.parametrize("encoders", [1, 2])
def test_every_codec_reads_back_identical(tmp_path, matrix, compression, encoders):
    storage = Storage(str(tmp_path))
    writer = PartWriter(storage, "part-00000.parquet", dense_schema(7, "float64"), {},
                        group_rows=4, compression=compression, encoders=encoders)
    for a in range(0, 23, 5):
        writer.write(a, matrix[a:a + 5])
    info = writer.commit()
    codec = pq.ParquetFile(tmp_path / info.file).metadata.row_group(0).column(1).compression
    assert codec == {"none": "UNCOMPRESSED"}.get(compression, compression.split(":")[0].upper())
    table = pq.read_table(tmp_path / info.file)
    assert table.column("row").to_pylist() == list(range(23))
    got = table.column("values").combine_chunks().flatten().to_numpy().reshape(23, 7)
    np.testing.assert_array_equal(got, matrix)
