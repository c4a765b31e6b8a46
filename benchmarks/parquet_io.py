"""Parquet write and full read-back: jacpipe's PartWriter / read_jacobian vs raw pyarrow.

The same float32 array (rows of an MLP Jacobian, so the bytes compress like
real results) is written by ``PartWriter`` the way a worker writes a shard
(blocks of one row group each, then ``commit``: fsync, rename, sha256 of the
bytes) and by one ``pq.write_table`` with the same settings (zstd,
BYTE_STREAM_SPLIT on the values, no dictionary, statistics on ``row`` only,
the same row-group size), without fsync. Reading back: ``read_jacobian``
(with and without the sha256 check) vs ``pq.read_table`` plus the conversion
to one numpy array. Interleaved rounds; medians.

    python -m benchmarks.parquet_io            # 4000 x 16000 float32 (256 MB)
    python -m benchmarks.parquet_io --quick    # 1000 x 4000
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import Report, Target, interleaved, median, parser, seconds

WRITE_TARGET = 0.7


def jacobian_block(rows: int, n: int) -> Any:
    """``rows`` x ``n`` rows of an MLP Jacobian, row-major float32 numpy."""
    from jobs.mlp import build
    from pipeline.maths import jacobian_rows

    p = build(n=n, m=rows, hidden=512)
    return jacobian_rows(p.fn, p.x, 0, rows, chunk_size=512).contiguous().numpy()


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core import Shapes
    from pipeline.runner.plan import group_rows
    from pipeline.store import Manifest, PartWriter, Storage, dense_schema, read_jacobian

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp dir in /tmp)")
    args = p.parse_args(argv)
    rows, n = (1000, 4000) if args.quick else (4000, 16_000)
    repeats = max(3, args.repeats or 5)
    report = Report("parquet_io", quick=args.quick)
    data = jacobian_block(rows, n)
    group = group_rows(n, 4)
    root = Path(tempfile.mkdtemp(prefix="jacpipe-pqio-", dir=args.dir or "/tmp"))
    out = root / "result"
    out.mkdir()
    raw_path = root / "raw.parquet"
    schema = dense_schema(n, "float32")
    shapes = Shapes("jacobian", (n,), (rows,), None, "float32")
    entry: dict[str, Any] = {}

    def part_writer() -> None:
        writer = PartWriter(Storage(str(out)), "part-00000.parquet", schema, {}, group_rows=group)
        for a in range(0, rows, group):
            writer.write(a, data[a : a + group])
        info = writer.commit()
        entry.update(index=0, start=0, stop=rows, file=info.file, rows=info.rows,
                     checksum=info.checksum, bytes=info.bytes)

    def raw_write(fsync: bool = False) -> None:
        table = pa.table({
            "row": pa.array(np.arange(rows, dtype=np.int64)),
            "values": pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), n),
        }, schema=schema)
        with open(raw_path, "wb") as f:
            pq.write_table(
                table, f, row_group_size=group, compression="zstd", use_dictionary=False,
                write_statistics=["row"],
                column_encoding={"row": "PLAIN", "values.list.element": "BYTE_STREAM_SPLIT"},
            )
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    def raw_read() -> Any:
        table = pq.read_table(raw_path)
        values = table.column("values").combine_chunks().flatten().to_numpy()
        return values.reshape(-1, n)

    try:
        writes = {
            "PartWriter (blocks, fsync, rename, sha256)": part_writer,
            "pq.write_table (same settings)": raw_write,
            "pq.write_table + fsync": lambda: raw_write(fsync=True),
        }
        wt = interleaved(writes, repeats=repeats)
        Manifest.from_json({
            "format_version": 1, "kind": "jacobian", "shapes": shapes.to_json(),
            "dtype": "float32", "plan": [[0, rows]], "shards": [entry], "status": "complete",
        }).write(Storage(str(out)))
        assert np.array_equal(read_jacobian(out), data) and np.array_equal(raw_read(), data)
        reads = {
            "read_jacobian (sha256 verify)": lambda: read_jacobian(out),
            "read_jacobian (verify=False)": lambda: read_jacobian(out, verify=False),
            "pq.read_table + to_numpy": raw_read,
        }
        rt = interleaved(reads, repeats=repeats)
        size = os.path.getsize(out / "part-00000.parquet")
        raw_size = os.path.getsize(raw_path)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    mb = data.nbytes / 1e6
    raw_w = median(wt["pq.write_table (same settings)"])
    raw_r = median(rt["pq.read_table + to_numpy"])
    report.table(
        f"Write {rows:,} x {n:,} float32 ({mb:,.0f} MB raw; file {size / 1e6:,.0f} MB, "
        f"raw pyarrow {raw_size / 1e6:,.0f} MB), median of {repeats}",
        ["writer", "median", "MB/s", "speed vs pq.write_table"],
        [[k, seconds(median(v)), f"{mb / median(v):,.0f}", f"{raw_w / median(v):.2f}x"]
         for k, v in wt.items()],
    )
    report.table(
        f"Full read-back into one numpy array, median of {repeats}",
        ["reader", "median", "MB/s", "speed vs pq.read_table"],
        [[k, seconds(median(v)), f"{mb / median(v):,.0f}", f"{raw_r / median(v):.2f}x"]
         for k, v in rt.items()],
    )
    pw = median(wt["PartWriter (blocks, fsync, rename, sha256)"])
    report.target(Target("PartWriter write speed / raw pq.write_table", raw_w / pw, WRITE_TARGET))
    report.facts = {"rows": rows, "n": n, "group_rows": group, "file_bytes": size,
                    "raw_file_bytes": raw_size, "write_s": wt, "read_s": rt}
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
