"""Test helpers: a matrix written as parts and a manifest."""

from __future__ import annotations

from pipeline.store.manifest import Manifest
from pipeline.store.parts import PartWriter, dense_schema
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
