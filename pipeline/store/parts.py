"""Part files: the one schema per layout, and the streaming writer of one shard's part.

A part is written under a temporary name, row group by row group (so a shard
never has to fit in memory), hashed while it is written, and renamed into
place by :meth:`PartWriter.commit`; its sha256 becomes the shard's checksum.
Writer settings (DESIGN.md): zstd (``--compression``), no dictionary,
BYTE_STREAM_SPLIT on the values, statistics on ``row`` only.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.codec import AUTO, DEFAULT_COMPRESSION, parse_compression
from pipeline.core.heap import glibc
from pipeline.store import footer
from pipeline.store.arrays import arrow_array, numpy_view
from pipeline.store.storage import Storage

#: Key of the JSON facts in each part file's schema metadata.
META_KEY = b"jacpipe"
ARROW_FLOAT = {"float32": pa.float32(), "float64": pa.float64()}
NUMPY_FLOAT = {"float32": np.float32, "float64": np.float64}


def part_name(index: int) -> str:
    """The file name of shard ``index``'s part: the one place it is spelled."""
    return f"part-{index:05d}.parquet"


def count_nonfinite(values: np.ndarray) -> tuple[int, int]:
    """``(NaN count, Inf count)`` of an array (cheap when everything is finite)."""
    if np.isfinite(values).all():
        return 0, 0
    return int(np.isnan(values).sum()), int(np.isinf(values).sum())


def dense_values_type(n: int, dtype: str) -> pa.DataType:
    """``fixed_size_list<element: float not null>[n]``: the dense ``values`` column's type.

    NOTE: non-nullable elements spare the reader the elements' definition
    levels. Raw ``pq.read_table`` of a 1,000 x 20,000 float32 zstd part ran
    1.42x faster in a standalone run on 2 busy cores (0.167 s vs 0.237 s,
    median of 5), 1.05x in benchmarks/scale.py there and 1.00x on a 16-core
    host: never slower, and a Jacobian entry is never null. Parts written
    before (nullable elements) read the same way; the format version stays 1.
    """
    return pa.list_(pa.field("element", ARROW_FLOAT[dtype], nullable=False), n)


def dense_schema(
    n: int, dtype: str, *, index: str | None = None, extra: tuple[str, ...] = (),
    coords: int = 0,
) -> pa.Schema:
    """The one schema of a dense part file (``row``, [``sample`` | ``point``], ``values``).

    Args:
        n: entries per row.
        dtype: ``float32`` or ``float64``.
        index: the kind's integer column beside ``row`` (``sample`` of a
            per-sample row, ``point`` of a per-point row), or None.
        extra: more ``fixed_size_list[n]`` columns after ``values``: a smoothed
            result's ``stderr`` (and ``zeroth``, ``zeroth_stderr``), a per-point
            result's ``value`` (``fn`` itself) and ``stderr``. Readers of
            ``values`` ignore them.
        coords: a per-point result's point coordinates, when a point has at
            most three (``x``, ``fixed_size_list[coords]``: what ``inspect --plot``
            draws the operator over); 0 for none.
    """
    fields = [pa.field("row", pa.int64(), nullable=False)]
    if index is not None:
        fields.append(pa.field(index, pa.int64(), nullable=False))
    fields.append(pa.field("values", dense_values_type(n, dtype), nullable=False))
    fields += [pa.field(name, dense_values_type(n, dtype), nullable=False) for name in extra]
    if coords:
        fields.append(pa.field("x", dense_values_type(coords, dtype), nullable=False))
    return pa.schema(fields)


def sparse_schema(dtype: str) -> pa.Schema:
    """The one schema of a sparse part file (``row``, ``cols``, ``values``)."""
    return pa.schema([
        pa.field("row", pa.int64(), nullable=False),
        pa.field("cols", pa.list_(pa.int64()), nullable=False),
        pa.field("values", pa.list_(ARROW_FLOAT[dtype]), nullable=False),
    ])


class _HashingSink:
    """A write-only file object that hashes what passes through it.

    NOTE: hashing on a helper thread, overlapped with the compression of the
    next page, was tried and measured (benchmarks/parquet_io.py): no gain on
    2 busy cores, and a worker task owns one core anyway.
    """

    def __init__(self, sink: Any) -> None:
        self._sink = sink
        self._hash = hashlib.sha256()
        self._size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self._sink.write(view)
        self._size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        self._sink.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # the writer closes us; the Storage closes the real sink
        self.closed = True

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _return_free_memory() -> None:
    """Hand memory freed by a finished part back to the OS (Arrow's pool and the C heap).

    A worker sizes each shard's chunks from what it holds when the shard starts
    (``plan.chunk_rows``). Freed pages the allocators keep would count as held:
    measured on the 40,000 x 40,000 benchmark under a 1 GiB budget, chunks
    fell from 166 rows to 48 and, once, to 1 (a 164 s shard instead of 25 s).
    """
    pa.default_memory_pool().release_unused()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


@dataclass(frozen=True)
class PartInfo:
    """What a finished part file holds; becomes its manifest entry."""

    file: str
    rows: int
    checksum: str
    bytes: int
    nan: int
    inf: int


class PartWriter:
    """Stream blocks of rows into one part file: temp name, row groups, rename.

    Blocks are buffered up to one encoding piece (at most ``group_rows`` rows;
    see below), so memory is one piece plus one block whatever the shard's
    size, plus the encoded bytes of at most ``encoders + 1`` pieces in flight.

    Each row group is encoded into its own in-memory one-group Parquet file,
    on ``encoders`` threads when more than one (pyarrow releases the GIL), and
    the groups are written in order and stitched under one footer
    (:mod:`pipeline.store.footer`). The bytes, hence the sha256, are the same
    whatever the number of encoder threads.

    NOTE: [Encoding pieces]
        A buffered group of ``group_rows`` rows is written as up to
        MAX_PIECES row groups of at least PIECE_BYTES each: the unit of
        parallel encoding. Whole 32 MiB groups gave two threads 3 groups to
        share in a 1,000-row shard of 20,000 float32 columns (419 + 419 +
        162 rows: 1.5x at best measured on 16 cores); 8 MiB pieces give 12.
        The split depends on the schema and ``group_rows`` only, never on
        the number of threads, so the bytes stay the same. Readers take 8
        MiB row groups at the same speed (benchmarks/scale.py reads). A
        piece is encoded as soon as its rows are buffered: a pipelined
        shard's writer starts after one piece of compute, not one group.
    """

    def __init__(
        self,
        storage: Storage,
        file: str,
        schema: pa.Schema,
        meta: Mapping[str, Any],
        *,
        group_rows: int,
        compression: str = DEFAULT_COMPRESSION,
        encoders: int = 1,
    ) -> None:
        self.storage = storage
        self.file = file
        self.tmp = storage.temp_name(file)
        self.schema = schema.with_metadata({META_KEY: json.dumps(dict(meta)).encode()})
        self.group_rows = max(1, group_rows)
        self._piece_rows = piece_rows(self.schema, self.group_rows)
        self.encoders = max(1, int(encoders))
        self._options = writer_options(schema, compression)
        self._sink = storage.open_sink(self.tmp)
        self._hashing = _HashingSink(self._sink)
        self._hashing.write(footer.MAGIC)
        self._pool = (
            ThreadPoolExecutor(self.encoders, thread_name_prefix="jacpipe-encode")
            if self.encoders > 1 else None
        )
        self._pending: deque[Future[tuple[pa.Buffer, int, int]]] = deque()
        self._groups: list[Any] = []
        self._template: Any = None
        self._written_rows = 0
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self.rows = 0
        self.nan = 0
        self.inf = 0

    def write(self, start: int, block: np.ndarray, *, samples: np.ndarray | None = None) -> None:
        """Append rows ``start .. start + len(block)`` (dense layout)."""
        block = np.ascontiguousarray(block)
        r, n = block.shape
        rows = arrow_array(np.arange(start, start + r, dtype=np.int64))
        kind = self.schema.field("values").type
        values = pa.FixedSizeListArray.from_arrays(
            arrow_array(block.reshape(-1), kind.value_type), type=kind
        )
        arrays = [rows]
        if self.schema.field(1).name != "values":  # the kind's index column
            arrays.append(arrow_array(np.asarray(samples, dtype=np.int64)))
        arrays.append(values)
        self._append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def write_columns(self, start: int, columns: Mapping[str, np.ndarray]) -> None:
        """Append rows ``start ..`` of a dense part whose schema has ``extra`` columns.

        Args:
            start: the first row.
            columns: one ``(rows, n)`` array per non-``row`` column of the schema.
        """
        names = [name for name in self.schema.names if name != "row"]
        r = np.asarray(columns["values"]).shape[0]
        arrays = [arrow_array(np.arange(start, start + r, dtype=np.int64))]
        for name in names:  # NaN/Inf of `values` are counted on the encoder threads
            kind = self.schema.field(name).type
            if kind == pa.int64():  # the kind's index column (sample, point)
                arrays.append(arrow_array(np.asarray(columns[name], dtype=np.int64)))
                continue
            flat = np.ascontiguousarray(columns[name]).reshape(-1)
            arrays.append(pa.FixedSizeListArray.from_arrays(
                arrow_array(flat, kind.value_type), type=kind))
        self._append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def write_sparse(
        self, rows: np.ndarray, indptr: np.ndarray, cols: np.ndarray, values: np.ndarray
    ) -> None:
        """Append sparse rows in CSR form (sparse layout)."""
        values = np.ascontiguousarray(values)
        offsets = arrow_array(np.asarray(indptr, dtype=np.int32))
        batch = pa.RecordBatch.from_arrays(
            [
                arrow_array(np.asarray(rows, dtype=np.int64)),
                pa.ListArray.from_arrays(offsets, arrow_array(np.asarray(cols, dtype=np.int64))),
                pa.ListArray.from_arrays(offsets, arrow_array(values)),
            ],
            schema=self.schema,
        )
        self._append(batch)

    def _append(self, batch: pa.RecordBatch) -> None:
        self._buffer.append(batch)
        self._buffered += batch.num_rows
        self.rows += batch.num_rows
        if self._buffered >= self._piece_rows:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        # Pieces start at multiples of piece rows from the part's first row,
        # whatever the blocks' sizes: each is encoded as soon as it is whole,
        # so a pipelined shard's writer starts after one piece, not one group.
        if not self._buffer:
            return
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        piece = self._piece_rows
        full = table.num_rows if final else (table.num_rows // piece) * piece
        for p in range(0, full, piece):
            self._submit(table.slice(p, min(piece, full - p)))
        rest = table.slice(full)
        self._buffer = rest.to_batches() if rest.num_rows else []
        self._buffered = rest.num_rows

    def _submit(self, group: pa.Table) -> None:
        """Encode one row group (on the pool when there is one) and write what is done."""
        if self._pool is None:
            self._put(*_encode_group(group, self.schema, self._options))
            return
        # One piece queued beyond the running ones: a thread that finishes finds
        # its next piece while this thread writes the oldest.
        while len(self._pending) > self.encoders:
            self._put(*self._pending.popleft().result())
        self._pending.append(self._pool.submit(_encode_group, group, self.schema, self._options))

    def _put(self, encoded: pa.Buffer, nan: int = 0, inf: int = 0) -> None:
        """Append one encoded group's pages; keep its footer entry, shifted to where they land."""
        self.nan += nan
        self.inf += inf
        body, foot = footer.split(memoryview(encoded))
        if self._template is None:
            self._template = foot
        offset = self._hashing.tell() - len(footer.MAGIC)
        for group in footer.row_groups(foot):
            self._groups.append(footer.shift_row_group(group, offset, len(self._groups)))
        self._written_rows += _footer_rows(foot)
        self._hashing.write(body)

    def commit(self) -> PartInfo:
        """Finish the file and give it its final name."""
        self._flush(final=True)
        while self._pending:
            self._put(*self._pending.popleft().result())
        if self._template is None:  # no rows: the footer of an empty file
            self._template = footer.split(
                _encode_group(self.schema.empty_table(), self.schema, self._options)[0])[1]
        tail = footer.stitched_footer(self._template, self._groups, self._written_rows)
        self._hashing.write(tail)
        self._hashing.write(len(tail).to_bytes(4, "little"))
        self._hashing.write(footer.MAGIC)
        self._close_pool()
        self.storage.finish(self.tmp, self.file, self._sink)
        self._buffer = []
        _return_free_memory()
        return PartInfo(
            file=self.file,
            rows=self.rows,
            checksum=self._hashing.hexdigest,
            bytes=self._hashing.tell(),
            nan=self.nan,
            inf=self.inf,
        )

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def abort(self) -> None:
        """Drop the temp file (a failure inside the shard)."""
        self._close_pool()
        self._buffer = []
        try:
            self._sink.close()
        finally:
            self.storage.delete(self.tmp)
            _return_free_memory()


#: Bounds of the encoding pieces a buffered row group is cut into (NOTE: [Encoding pieces]).
PIECE_BYTES = 8 * 2**20
MAX_PIECES = 4


def piece_rows(schema: pa.Schema, group_rows: int) -> int:
    """Rows of one encoding piece (one row group of the file) of parts with this schema."""
    group_rows = max(1, group_rows)
    return -(-group_rows // _pieces(schema, group_rows))


def _pieces(schema: pa.Schema, group_rows: int) -> int:
    """Row groups per buffered group: as many as MAX_PIECES of PIECE_BYTES or more."""
    row_bytes = 0
    for field in schema:
        kind = field.type
        if pa.types.is_fixed_size_list(kind):
            row_bytes += kind.list_size * kind.value_type.bit_width // 8
        elif pa.types.is_primitive(kind):
            row_bytes += kind.bit_width // 8
        else:  # variable-length rows (the sparse layout): sizes unknown, one piece
            return 1
    return int(max(1, min(MAX_PIECES, group_rows * row_bytes // PIECE_BYTES)))


def writer_options(schema: pa.Schema, compression: str) -> dict[str, Any]:
    """``pq.ParquetWriter`` keyword arguments of a part with this schema and codec.

    Args:
        schema: a dense or sparse part schema.
        compression: ``zstd``, ``zstd:LEVEL``, ``lz4``, ``snappy`` or ``none`` (never ``auto``).
    """
    codec, level = parse_compression(compression)
    if codec == AUTO:  # resolved by ResultFolder.prepare (store/throughput.py) before any write
        raise ValueError("--compression auto reached a part writer unresolved")
    sparse = pa.types.is_list(schema.field("values").type) and not pa.types.is_fixed_size_list(
        schema.field("values").type
    )
    return {
        "compression": codec,
        "compression_level": level,
        "use_dictionary": False,
        "write_statistics": ["row"],
        "column_encoding": (
            {"values.list.element": "BYTE_STREAM_SPLIT"} if sparse
            else {"row": "PLAIN", "values.list.element": "BYTE_STREAM_SPLIT"}
        ),
    }


def _encode_group(
    table: pa.Table, schema: pa.Schema, options: Mapping[str, Any]
) -> tuple[pa.Buffer, int, int]:
    """One row group (or none) as a whole in-memory Parquet file, and its NaN and Inf counts.

    NOTE: the non-finite count runs here, on the encoder threads, not on the
    writer's: it is a full pass over the values, and the writer's own work
    (hashing, the sink) is what bounds the speed-up of more encoder threads.
    """
    buf = pa.BufferOutputStream()
    with pq.ParquetWriter(buf, schema, **options) as writer:
        if table.num_rows:
            writer.write_table(table, row_group_size=table.num_rows)
    nan = inf = 0
    for chunk in table.column("values").chunks:
        n, i = count_nonfinite(numpy_view(chunk.flatten()))
        nan, inf = nan + n, inf + i
    return buf.getvalue(), nan, inf


def _footer_rows(foot: Any) -> int:
    return sum(next(v for fid, _, v in g if fid == 3) for g in footer.row_groups(foot))
