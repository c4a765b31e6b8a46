"""The on-disk format: Parquet part files, the manifest, the writer and the readers.

Format version 1 (see the README's "Parquet format" section)::

    OUT/_manifest.json       the facts of the run and one entry per committed shard
    OUT/part-00000.parquet   rows [start, stop) of shard 0, one Parquet row per row of J

A shard is committed once its entry, with the sha256 of the part file's bytes,
is in the manifest. Readers trust committed shards only and verify them.
Temporary files start with ``.`` so ``pyarrow.dataset`` and friends ignore them.
Nothing stored is unpickled or executed when a result is read: the manifest
and the Parquet key-value metadata are JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import JacpipeError
from pipeline.problem import Shapes

FORMAT_VERSION = 1
MANIFEST = "_manifest.json"
META_KEY = b"jacpipe"
_ARROW_FLOAT = {"float32": pa.float32(), "float64": pa.float64()}
_NUMPY_FLOAT = {"float32": np.float32, "float64": np.float64}


def dense_schema(n: int, dtype: str, *, batched: bool = False) -> pa.Schema:
    """The one schema of a dense part file (``row``, [``sample``], ``values``)."""
    fields = [pa.field("row", pa.int64(), nullable=False)]
    if batched:
        fields.append(pa.field("sample", pa.int64(), nullable=False))
    fields.append(pa.field("values", pa.list_(_ARROW_FLOAT[dtype], n), nullable=False))
    return pa.schema(fields)


def sparse_schema(dtype: str) -> pa.Schema:
    """The one schema of a sparse part file (``row``, ``cols``, ``values``)."""
    return pa.schema([
        pa.field("row", pa.int64(), nullable=False),
        pa.field("cols", pa.list_(pa.int64()), nullable=False),
        pa.field("values", pa.list_(_ARROW_FLOAT[dtype]), nullable=False),
    ])


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# Storage: a local folder or a pyarrow.fs URI (s3://...)
# ---------------------------------------------------------------------------


class Storage:
    """A result folder on a local disk or on any ``pyarrow.fs`` filesystem.

    Local folders: temp name, ``fsync``, atomic ``os.replace``. Object stores
    (``s3://...``): every write goes straight to its final key. An upload
    becomes visible only when its stream is closed, as a whole, so a reader
    never sees half an object; a temp key plus ``move`` would add a server-side
    copy (CopyObject, limited to 5 GiB) and a delete for nothing.

    ``uri`` is what the user gave (it may hold credentials and is what workers
    need); ``display`` is the same with any secret masked, for messages.
    """

    #: ``scheme://KEY:SECRET@`` and ``secret_key=`` / ``session_token=`` query values.
    _SECRET_RE = re.compile(
        r"(?P<a>[a-z][a-z0-9+.-]*://[^:/@?#\s]*:)[^@/?#\s]+(?=@)"
        r"|(?P<b>[?&](?:secret_key|session_token|secret|password)=)[^&#\s]+",
        re.IGNORECASE,
    )

    def __init__(self, out: str) -> None:
        self.uri = str(out)
        self.display = self.redact(self.uri)
        if "://" in self.uri and not self.uri.startswith("file://"):
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            except (pa.ArrowInvalid, OSError, ValueError) as exc:
                raise JacpipeError(
                    f"output {self.display!r}: cannot open it ({self.redact(str(exc))}); "
                    "expected a local folder or a URI like s3://bucket/prefix"
                ) from None
            self.local = False
        else:
            path = self.uri.removeprefix("file://")
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(path)
            self.local = True

    @classmethod
    def redact(cls, text: str) -> str:
        """``text`` with the secrets of any URI in it replaced by ``***``."""
        return cls._SECRET_RE.sub(
            lambda m: (m.group("a") or m.group("b")) + "***", text
        )

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def size(self, name: str) -> int | None:
        info = self.fs.get_file_info(self.path(name))
        return info.size if info.type == pafs.FileType.File else None

    def listdir(self) -> list[str]:
        if not self.is_dir():
            return []
        sel = pafs.FileSelector(self.root, recursive=False, allow_not_found=True)
        # A set: an object store may list a name twice (an object and a "dir/" marker).
        return sorted({i.base_name for i in self.fs.get_file_info(sel)})

    def makedirs(self) -> None:
        if not self.local and self.fs.get_file_info(self.root).type == pafs.FileType.File:
            # Object stores would happily put keys "under" an object.
            raise NotADirectoryError(errno.ENOTDIR, "an object with this name exists")
        self.fs.create_dir(self.root, recursive=True)

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write ``name`` so a reader sees the old or the new bytes, never a mix."""
        if not self.local:
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(data)
            return
        tmp = f".{name}.{uuid.uuid4().hex}.tmp"
        with open(self.path(tmp), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.path(tmp), self.path(name))

    def temp_name(self, name: str) -> str:
        """Where a file is written before it is ``finish``-ed as ``name``.

        Local: a hidden ``.NAME.<uuid>.tmp`` that readers skip. Object stores:
        ``name`` itself (see the class docstring).
        """
        if not self.local:
            return name
        return f".{name.removesuffix('.parquet')}.{uuid.uuid4().hex}.tmp"

    def open_sink(self, name: str) -> Any:
        if self.local:
            return open(self.path(name), "wb")
        return self.fs.open_output_stream(self.path(name))

    def finish(self, tmp: str, name: str, sink: Any) -> None:
        """Close a temp file durably and give it its final name."""
        if self.local:
            sink.flush()
            os.fsync(sink.fileno())
            sink.close()
            os.replace(self.path(tmp), self.path(name))
            return
        sink.close()  # the object appears now, whole
        if tmp != name:
            self.fs.move(self.path(tmp), self.path(name))

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path(name)) as f:
            while chunk := f.read(8 * 2**20):
                h.update(chunk)
        return h.hexdigest()


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
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None


_LIBC = _libc()


# ---------------------------------------------------------------------------
# Writing one part file
# ---------------------------------------------------------------------------


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

    Blocks are buffered up to one row group (``group_rows`` rows), so memory is
    one row group plus one block whatever the shard's size.
    """

    def __init__(
        self,
        storage: Storage,
        file: str,
        schema: pa.Schema,
        meta: Mapping[str, Any],
        *,
        group_rows: int,
    ) -> None:
        self.storage = storage
        self.file = file
        self.tmp = storage.temp_name(file)
        self.schema = schema.with_metadata({META_KEY: json.dumps(dict(meta)).encode()})
        self.group_rows = max(1, group_rows)
        self._sink = storage.open_sink(self.tmp)
        self._hashing = _HashingSink(self._sink)
        sparse = pa.types.is_list(schema.field("values").type) and not pa.types.is_fixed_size_list(
            schema.field("values").type
        )
        self._writer = pq.ParquetWriter(
            self._hashing,
            self.schema,
            compression="zstd",
            use_dictionary=False,
            write_statistics=["row"],
            column_encoding=(
                {"values.list.element": "BYTE_STREAM_SPLIT"} if sparse
                else {"row": "PLAIN", "values.list.element": "BYTE_STREAM_SPLIT"}
            ),
        )
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self.rows = 0
        self.nan = 0
        self.inf = 0

    def write(self, start: int, block: np.ndarray, *, samples: np.ndarray | None = None) -> None:
        """Append rows ``start .. start + len(block)`` (dense layout)."""
        block = np.ascontiguousarray(block)
        r, n = block.shape
        if not np.isfinite(block).all():
            self.nan += int(np.isnan(block).sum())
            self.inf += int(np.isinf(block).sum())
        rows = pa.array(np.arange(start, start + r, dtype=np.int64))
        values = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), n)
        arrays = [rows]
        if "sample" in self.schema.names:
            arrays.append(pa.array(np.asarray(samples, dtype=np.int64)))
        arrays.append(values)
        self._append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def write_sparse(
        self, rows: np.ndarray, indptr: np.ndarray, cols: np.ndarray, values: np.ndarray
    ) -> None:
        """Append sparse rows in CSR form (sparse layout)."""
        values = np.ascontiguousarray(values)
        if not np.isfinite(values).all():
            self.nan += int(np.isnan(values).sum())
            self.inf += int(np.isinf(values).sum())
        offsets = pa.array(np.asarray(indptr, dtype=np.int32))
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(np.asarray(rows, dtype=np.int64)),
                pa.ListArray.from_arrays(offsets, pa.array(np.asarray(cols, dtype=np.int64))),
                pa.ListArray.from_arrays(offsets, pa.array(values)),
            ],
            schema=self.schema,
        )
        self._append(batch)

    def _append(self, batch: pa.RecordBatch) -> None:
        self._buffer.append(batch)
        self._buffered += batch.num_rows
        self.rows += batch.num_rows
        if self._buffered >= self.group_rows:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        full = table.num_rows if final else (table.num_rows // self.group_rows) * self.group_rows
        if full:
            self._writer.write_table(table.slice(0, full), row_group_size=self.group_rows)
        rest = table.slice(full)
        self._buffer = rest.to_batches() if rest.num_rows else []
        self._buffered = rest.num_rows

    def commit(self) -> PartInfo:
        """Finish the file and give it its final name."""
        self._flush(final=True)
        self._writer.close()
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

    def abort(self) -> None:
        """Drop the temp file (a failure inside the shard)."""
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - already failing; the temp file goes anyway
            pass
        self._buffer = []
        try:
            self._sink.close()
        finally:
            self.storage.delete(self.tmp)
            _return_free_memory()


# ---------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------


def read_manifest(storage: Storage) -> dict[str, Any] | None:
    """The manifest of a folder, or ``None`` if it has none.

    Raises:
        JacpipeError: the manifest exists but is not a jacpipe manifest, or is
            corrupt (not JSON, or entries that do not match its plan).
    """
    if not storage.exists(MANIFEST):
        return None
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JacpipeError(
            f"{storage.path(MANIFEST)} is corrupt (not valid JSON: {exc}); its shards cannot "
            "be trusted: rerun `jacpipe run` with --overwrite to recompute the result"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise JacpipeError(
            f"{storage.path(MANIFEST)}: not a jacpipe manifest of format_version {FORMAT_VERSION}"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise JacpipeError(
            f"{storage.path(MANIFEST)} is corrupt ({problem}); its shards cannot be trusted: "
            "rerun `jacpipe run` with --overwrite to recompute the result"
        )
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is structurally wrong with a parsed manifest, or ``None``.

    A reader must never index a missing key or trust a shard entry that does
    not describe exactly its planned rows and file: a hand-edited or
    bit-rotted manifest is one clear error, not a traceback or a wrong read.
    """
    try:
        shapes = Shapes.from_json(manifest["shapes"])
        total = shapes.total_rows
    except (KeyError, TypeError, ValueError) as exc:
        return f"bad or missing 'shapes': {exc!r}"
    plan = manifest.get("plan")
    if not isinstance(plan, list) or not plan:
        return "bad or missing 'plan'"
    edge = 0
    for i, bounds in enumerate(plan):
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or not all(isinstance(b, int) for b in bounds)
            or bounds[0] != edge
            or bounds[1] <= bounds[0]
        ):
            return f"plan entry {i} is {bounds!r}"
        edge = bounds[1]
    if edge != total:
        return f"the plan covers {edge} rows, the shapes say {total}"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "bad or missing 'shards'"
    seen: set[int] = set()
    for entry in shards:
        try:
            index = entry["index"]
            ok = (
                isinstance(index, int)
                and 0 <= index < len(plan)
                and index not in seen
                and [entry["start"], entry["stop"]] == plan[index]
                and entry["rows"] == entry["stop"] - entry["start"]
                and entry["file"] == f"part-{index:05d}.parquet"
                and isinstance(entry["checksum"], str)
                and len(entry["checksum"]) == 64
            )
        except (KeyError, TypeError):
            ok = False
        if not ok:
            return f"shard entry {json.dumps(entry, default=str)[:120]} does not match the plan"
        seen.add(index)
    return None


def write_manifest(storage: Storage, manifest: dict[str, Any]) -> None:
    """Rewrite the manifest atomically."""
    manifest["updated"] = utcnow()
    storage.write_atomic(MANIFEST, json.dumps(manifest, indent=1, sort_keys=False).encode())


def versions() -> dict[str, str]:
    """Versions of jacpipe and the libraries that produced a result."""
    import importlib.metadata as md

    out = {}
    for name in ("jacpipe", "torch", "ray", "pyarrow", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "unknown"
    return out


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardProblem:
    """A planned shard that a reader cannot trust."""

    index: int
    file: str
    reason: str  # "missing" | "corrupt" | "not committed"

    def __str__(self) -> str:
        return f"shard {self.index} ({self.file}): {self.reason}"


class JacobianResult:
    """A result folder opened for reading: metadata first, rows streamed on demand.

    Use :func:`open_jacobian` to get one.
    """

    def __init__(self, out: str) -> None:
        self.storage = Storage(out)
        manifest = read_manifest(self.storage)
        if manifest is None:
            raise JacpipeError(
                f"{out!r} is not a jacpipe result (no {MANIFEST}); "
                "give the --out folder of a `jacpipe run`"
            )
        self.manifest = manifest
        self.shapes = Shapes.from_json(manifest["shapes"])
        self.layout = manifest.get("layout", "dense")
        self._entries = {int(s["index"]): s for s in manifest.get("shards", [])}
        self._verified: dict[int, bool] = {}

    # -- facts --------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(total_rows, n)``: the result as a 2-D matrix of flat rows."""
        return (self.shapes.total_rows, self.shapes.n)

    @property
    def dtype(self) -> str:
        return self.shapes.dtype

    @property
    def plan(self) -> list[tuple[int, int, int]]:
        """``(index, start, stop)`` of every planned shard."""
        return [(i, a, b) for i, (a, b) in enumerate(self.manifest["plan"])]

    @property
    def committed(self) -> list[dict[str, Any]]:
        return [self._entries[i] for i in sorted(self._entries)]

    # -- integrity ------------------------------------------------------------
    def check(self, *, checksums: bool = True) -> list[ShardProblem]:
        """Every planned shard that is not committed, is missing, or is corrupt."""
        problems = []
        for index, _, _ in self.plan:
            problem = self._check_one(index, checksums=checksums)
            if problem is not None:
                problems.append(problem)
        return problems

    def _check_one(self, index: int, *, checksums: bool) -> ShardProblem | None:
        file = f"part-{index:05d}.parquet"
        entry = self._entries.get(index)
        if entry is None:
            return ShardProblem(index, file, "not committed")
        size = self.storage.size(entry["file"])
        if size is None:
            return ShardProblem(index, entry["file"], "missing")
        if size != entry.get("bytes", size):
            return ShardProblem(
                index, entry["file"], f"corrupt (size {size} bytes, manifest {entry['bytes']})"
            )
        if checksums and not self._verified.get(index):
            if self.storage.sha256(entry["file"]) != entry["checksum"]:
                return ShardProblem(index, entry["file"], "corrupt (checksum mismatch)")
            self._verified[index] = True
        return None

    def _require(self, index: int, *, verify: bool) -> dict[str, Any]:
        problem = self._check_one(index, checksums=verify)
        if problem is not None:
            raise JacpipeError(
                f"{self.storage.display}: {problem}; rerun `jacpipe run` with the same "
                "options to recompute it"
            )
        return self._entries[index]

    # -- rows -------------------------------------------------------------------
    def _shards_for(self, rows: np.ndarray) -> list[tuple[int, int, int]]:
        starts = np.array([a for _, a, _ in self.plan])
        hit = np.unique(np.searchsorted(starts, rows, side="right") - 1)
        return [self.plan[i] for i in hit]

    def iter_blocks(
        self, rows: Sequence[int] | np.ndarray | slice | None = None, *, verify: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_indices, block)`` in row order, one Parquet row group at a time.

        Args:
            rows: flat rows to read (sorted or not, no duplicates); ``None`` = all.
            verify: check each part file's sha256 before reading it.

        Raises:
            JacpipeError: a needed shard is missing, uncommitted or corrupt.
        """
        if self.layout != "dense":
            raise JacpipeError("iter_blocks reads dense results; use read_jacobian for sparse")
        wanted = self._normalise_rows(rows)
        shards = self.plan if wanted is None else self._shards_for(wanted)
        for index, start, stop in shards:
            entry = self._require(index, verify=verify)
            pf = pq.ParquetFile(self.storage.path(entry["file"]), filesystem=self.storage.fs)
            sel = None if wanted is None else wanted[(wanted >= start) & (wanted < stop)]
            for g in range(pf.num_row_groups):
                stats = pf.metadata.row_group(g).column(0).statistics
                if sel is not None and stats is not None and stats.has_min_max:
                    if not ((sel >= stats.min) & (sel <= stats.max)).any():
                        continue
                table = pf.read_row_group(g, columns=["row", "values"])
                row_idx = table.column("row").to_numpy()
                block = _fixed_list_to_numpy(table.column("values"), self.shapes.n)
                if sel is not None:
                    keep = np.isin(row_idx, sel)
                    row_idx, block = row_idx[keep], block[keep]
                if len(row_idx):
                    yield row_idx, block

    def _normalise_rows(self, rows: Any) -> np.ndarray | None:
        total = self.shapes.total_rows
        if rows is None:
            return None
        if isinstance(rows, slice):
            return np.arange(total)[rows]
        arr = np.asarray(rows, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= total):
            raise JacpipeError(f"rows out of range: the result has {total} rows")
        return arr

    def read(
        self,
        rows: Sequence[int] | np.ndarray | slice | None = None,
        *,
        as_: str | None = None,
        verify: bool = True,
        reshape: bool = False,
        sample: int | Sequence[int] | np.ndarray | None = None,
    ) -> Any:
        """The requested rows as one array (see :func:`read_jacobian`)."""
        if as_ is None:
            as_ = "scipy" if self.layout == "sparse" else "numpy"
        if as_ not in ("numpy", "torch", "scipy"):
            raise JacpipeError(f"as_ must be numpy, torch or scipy, got {as_!r}")
        if sample is not None:
            return self._read_samples(sample, rows, as_=as_, verify=verify, reshape=reshape)
        if self.layout == "sparse":
            return self._read_sparse(rows, as_=as_, verify=verify)
        wanted = self._normalise_rows(rows)
        inverse = None
        if wanted is not None:
            # Repeated rows are read once and repeated in the output, as numpy indexing does.
            unique, inverse = np.unique(wanted, return_inverse=True)
            if len(unique) == len(wanted):
                inverse = None
            else:
                wanted = unique
        count = self.shapes.total_rows if wanted is None else len(wanted)
        out = np.empty((count, self.shapes.n), dtype=_NUMPY_FLOAT[self.dtype])
        if wanted is None:
            position = None
        else:
            order = np.argsort(wanted, kind="stable")
            sorted_rows = wanted[order]
        filled = 0
        for row_idx, block in self.iter_blocks(wanted, verify=verify):
            if wanted is None:
                lo = int(row_idx[0])
                if int(row_idx[-1]) - lo + 1 == len(row_idx):  # contiguous: a slice, no gather
                    out[lo : lo + len(row_idx)] = block
                else:
                    out[row_idx] = block
            else:
                position = order[np.searchsorted(sorted_rows, row_idx)]
                out[position] = block
            filled += len(row_idx)
        if filled != count:
            raise JacpipeError(f"{self.storage.display}: expected {count} rows, found {filled}")
        if inverse is not None:
            out = out[inverse]
        if reshape and wanted is None:
            out = out.reshape(self.full_shape)
        elif self.shapes.kind == "batched" and wanted is None:
            out = out.reshape(self.shapes.batch, self.shapes.m, self.shapes.n)
        if as_ == "torch":
            import torch

            return torch.from_numpy(out)
        if as_ == "scipy":
            import scipy.sparse as sp

            return sp.csr_matrix(out.reshape(-1, self.shapes.n))
        return out

    def _read_samples(
        self, sample: Any, rows: Any, *, as_: str, verify: bool, reshape: bool
    ) -> Any:
        """Whole samples of a batched result: ``(m, n)`` for one, ``(k, m, n)`` for k."""
        s = self.shapes
        if s.kind != "batched":
            raise JacpipeError(
                f"sample=: only batched results have samples; this one is kind {s.kind!r} "
                "(read rows instead)"
            )
        if rows is not None:
            raise JacpipeError("give rows or sample, not both")
        picked = np.asarray(sample, dtype=np.int64)
        one = picked.ndim == 0
        picked = picked.reshape(-1)
        if picked.size and (picked.min() < 0 or picked.max() >= s.batch):
            raise JacpipeError(
                f"sample {picked[(picked < 0) | (picked >= s.batch)][0]} out of range: "
                f"the result has {s.batch} samples (0..{s.batch - 1})"
            )
        flat = (picked[:, None] * s.m + np.arange(s.m)).reshape(-1)
        out = np.asarray(self.read(flat, verify=verify))
        if as_ == "scipy":
            import scipy.sparse as sp

            return sp.csr_matrix(out)
        block = tuple(s.out_shape) + tuple(s.in_shape) if reshape else (s.m, s.n)
        out = out.reshape(block if one else (len(picked), *block))
        if as_ == "torch":
            import torch

            return torch.from_numpy(out)
        return out

    def _read_sparse(self, rows: Any, *, as_: str, verify: bool) -> Any:
        import scipy.sparse as sp

        wanted = self._normalise_rows(rows)
        shards = self.plan if wanted is None else self._shards_for(wanted)
        r_all, c_all, v_all = [], [], []
        for index, _, _ in shards:
            entry = self._require(index, verify=verify)
            table = pq.read_table(self.storage.path(entry["file"]), filesystem=self.storage.fs)
            lengths = table.column("cols").combine_chunks().value_lengths().to_numpy()
            rows_here = np.repeat(table.column("row").to_numpy(), lengths)
            cols = table.column("cols").combine_chunks().flatten().to_numpy()
            vals = table.column("values").combine_chunks().flatten().to_numpy()
            r_all.append(rows_here)
            c_all.append(cols)
            v_all.append(vals)
        r = np.concatenate(r_all) if r_all else np.zeros(0, np.int64)
        c = np.concatenate(c_all) if c_all else np.zeros(0, np.int64)
        v = np.concatenate(v_all) if v_all else np.zeros(0, _NUMPY_FLOAT[self.dtype])
        mat = sp.csr_matrix((v, (r, c)), shape=self.shape)
        if wanted is not None:
            mat = mat[wanted]
        if as_ == "numpy":
            return mat.toarray()
        if as_ == "torch":
            import torch

            return torch.from_numpy(mat.toarray())
        return mat

    @property
    def full_shape(self) -> tuple[int, ...]:
        """``out_shape + in_shape`` (batched: ``(B,) + out_shape + in_shape``)."""
        s = self.shapes
        lead = (s.batch,) if s.kind == "batched" else ()
        return lead + tuple(s.out_shape) + tuple(s.in_shape)


def _fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, n: int) -> np.ndarray:
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, n) for c in chunks]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def open_jacobian(out: str | os.PathLike[str]) -> JacobianResult:
    """Open a result folder for streaming reads.

    Example::

        res = open_jacobian("out/mlp")
        for rows, block in res.iter_blocks():   # one row group at a time
            print(rows[0], block.shape)

    Raises:
        JacpipeError: the folder is not a jacpipe result.
    """
    return JacobianResult(os.fspath(out))


def read_jacobian(
    out: str | os.PathLike[str],
    rows: Sequence[int] | np.ndarray | slice | None = None,
    *,
    as_: str | None = None,
    verify: bool = True,
    reshape: bool = False,
    sample: int | Sequence[int] | np.ndarray | None = None,
) -> Any:
    """Read a result (or some of its rows) into memory.

    Args:
        out: the result folder (local path or ``s3://`` URI).
        rows: flat rows to read, in the order given; ``None`` reads all.
        as_: ``"numpy"``, ``"torch"`` or ``"scipy"`` (a CSR matrix); default:
            CSR for sparse results, numpy for dense ones.
        verify: check part files' sha256 against the manifest first.
        reshape: restore ``out_shape + in_shape`` (all rows, or ``sample``).
        sample: batched results only, instead of ``rows``: one sample's block
            ``(m, n)`` (an int) or several ``(k, m, n)`` (a sequence).

    Returns:
        ``(m, n)`` for a Jacobian or Hessian, ``(B, m, n)`` for a batched result
        read whole, ``(len(rows), n)`` for selected rows, ``(m, n)`` for one
        ``sample``; CSR for sparse results.

    Raises:
        JacpipeError: not a result, or a needed shard is missing or corrupt.
    """
    return open_jacobian(out).read(
        rows, as_=as_, verify=verify, reshape=reshape, sample=sample
    )
