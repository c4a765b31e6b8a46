"""Reading a result: metadata first, rows streamed on demand, only committed parts trusted.

:func:`open_jacobian` opens a folder (:class:`JacobianResult`), :func:`read_jacobian`
reads it (or some rows) into memory. Parts are checked against the manifest
(size, sha256) before they are read. Nothing stored is unpickled or executed:
the manifest and the part metadata are JSON.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import kind_of, layout_of
from pipeline.core.shard import ShardResult
from pipeline.store.arrays import numpy_view
from pipeline.store.manifest import MANIFEST, Manifest
from pipeline.store.parts import NUMPY_FLOAT, part_name
from pipeline.store.storage import Storage

_T = TypeVar("_T")


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
        manifest = Manifest.read(self.storage)
        if manifest is None and self.storage.local and not self.storage.is_dir():
            raise JacpipeError(
                f"{self.storage.display!r} does not exist; "
                "give the --out folder of a `jacpipe run`"
            )
        if manifest is None:
            raise JacpipeError(
                f"{self.storage.display!r} is not a jacpipe result (no {MANIFEST}); "
                "give the --out folder of a `jacpipe run`"
            )
        self.manifest = manifest
        self.shapes = manifest.shapes
        self.layout = manifest.layout
        self._verified: dict[int, bool] = {}
        self._meta: dict[int, Any] = {}  # part footers, read once by the schema check

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
        return [(i, a, b) for i, (a, b) in enumerate(self.manifest.plan)]

    @property
    def committed(self) -> list[ShardResult]:
        """Committed shards (not yet verified: see :meth:`check`), in index order."""
        return self.manifest.committed

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
        entry = self.manifest.shards.get(index)
        if entry is None:
            return ShardProblem(index, part_name(index), "not committed")
        size = self.storage.size(entry.file)
        if size is None:
            return ShardProblem(index, entry.file, "missing")
        if entry.bytes and size != entry.bytes:
            return ShardProblem(
                index, entry.file, f"corrupt (size {size} bytes, manifest {entry.bytes})"
            )
        if checksums and not self._verified.get(index):
            if self.storage.sha256(entry.file) != entry.checksum:
                return ShardProblem(index, entry.file, "corrupt (checksum mismatch)")
            self._verified[index] = True
        shape = self._shape_problem(entry)
        if shape is not None:
            return ShardProblem(index, entry.file, shape)
        return None

    def _shape_problem(self, entry: ShardResult) -> str | None:
        """Why part ``entry`` does not hold what the manifest says, or ``None``.

        A matching checksum proves the bytes are those written, not that the
        manifest's shapes describe them (an edited ``dtype``, a part copied from
        another run): the footer's ``values`` type and width, row count and
        ``row`` range are checked against the manifest before anything is read.
        """
        if entry.index in self._meta:
            return None
        try:
            meta = pq.read_metadata(self.storage.path(entry.file), filesystem=self.storage.fs)
        except (OSError, pa.ArrowInvalid) as exc:
            return f"corrupt (not a Parquet file: {self.storage.redact(str(exc))[:120]})"
        problem = _schema_problem(meta, self.layout, self.dtype, self.shapes.n)
        if problem is None:
            problem = _rows_problem(meta, entry.start, entry.stop,
                                    exact=layout_of(self.layout).fixed_width)
        if problem is None:
            self._meta[entry.index] = meta
        return problem

    def _require(self, index: int, *, verify: bool) -> ShardResult:
        problem = self._check_one(index, checksums=verify)
        if problem is not None:
            advice = (
                "rerun `jacpipe run` with --overwrite" if problem.reason.startswith("holds")
                else "rerun `jacpipe run` with the same options to recompute it"
            )
            raise JacpipeError(f"{self.storage.display}: {problem}; {advice}")
        return self.manifest.shards[index]

    # -- rows -------------------------------------------------------------------
    def _shards_for(self, rows: np.ndarray) -> list[tuple[int, int, int]]:
        starts = np.array([a for _, a, _ in self.plan])
        hit = np.unique(np.searchsorted(starts, rows, side="right") - 1)
        return [self.plan[i] for i in hit]

    def iter_blocks(
        self, rows: Sequence[int] | np.ndarray | slice | None = None, *, verify: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_indices, block)`` in row order, one Parquet row group at a time.

        Row groups are decoded on a small thread pool (:data:`READ_THREADS`),
        at most that many ahead of the one yielded, so memory stays a few
        row groups whatever the result's size.

        Args:
            rows: flat rows to read (sorted or not, no duplicates); ``None`` = all.
            verify: check each part file's sha256 before reading it.

        Raises:
            JacpipeError: a needed shard is missing, uncommitted or corrupt.
        """
        if not layout_of(self.layout).fixed_width:
            raise JacpipeError("iter_blocks reads dense results; use read_jacobian for sparse")
        wanted = self._normalize_rows(rows)
        yield from _prefetched(self._group_reads(wanted, verify=verify), READ_THREADS)

    def _group_reads(
        self, wanted: np.ndarray | None, *, verify: bool
    ) -> Iterator[Callable[[], tuple[np.ndarray, np.ndarray]]]:
        """One call per row group to read (row groups without wanted rows skipped)."""
        shards = self.plan if wanted is None else self._shards_for(wanted)
        n = self.shapes.n
        for index, start, stop in shards:
            entry = self._require(index, verify=verify)
            path = self.storage.path(entry.file)
            meta = self._meta[index]
            sel = None if wanted is None else wanted[(wanted >= start) & (wanted < stop)]
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(0).statistics
                if sel is not None and stats is not None and stats.has_min_max:
                    if not ((sel >= stats.min) & (sel <= stats.max)).any():
                        continue
                yield functools.partial(_read_group, path, self.storage.fs, meta, g, n, sel)

    def _normalize_rows(self, rows: Any) -> np.ndarray | None:
        """``rows`` as flat row indices (``None`` = all); see :func:`normalize_rows`."""
        return normalize_rows(rows, self.shapes.total_rows)

    def read(
        self,
        rows: Sequence[int] | np.ndarray | slice | None = None,
        *,
        as_: str | None = None,
        verify: bool = True,
        reshape: bool = False,
        sample: int | Sequence[int] | np.ndarray | None = None,
    ) -> Any:
        """The requested rows as one array (see :func:`read_jacobian`).

        Dispatches to :meth:`read_samples` (``sample=``), :meth:`read_sparse`
        (sparse layout) or :meth:`read_dense`, then converts to ``as_``.
        """
        if as_ is None:
            as_ = layout_of(self.layout).read_as
        if as_ not in _CONVERT:
            raise JacpipeError(f"as_ must be numpy, torch or scipy, got {as_!r}")
        if sample is not None:
            if rows is not None:
                raise JacpipeError("give rows or sample, not both")
            out = self.read_samples(sample, verify=verify, reshape=reshape)
        elif not layout_of(self.layout).fixed_width:
            out = self.read_sparse(rows, verify=verify)
        else:
            out = self.read_dense(rows, verify=verify, reshape=reshape)
        return _CONVERT[as_](out, self.shapes.n)

    def read_dense(self, rows: Any = None, *, verify: bool = True, reshape: bool = False) -> Any:
        """Dense rows as numpy: all of them (``(B, m, n)`` when batched) or ``(len(rows), n)``."""
        wanted = self._normalize_rows(rows)
        inverse = None
        if wanted is not None:
            # Repeated rows are read once and repeated in the output, as numpy indexing does.
            unique, inverse = np.unique(wanted, return_inverse=True)
            if len(unique) == len(wanted):
                inverse = None
            else:
                wanted = unique
        out = self._gather(wanted, verify=verify)
        if inverse is not None:
            out = out[inverse]
        kind = kind_of(self.shapes.kind)
        if wanted is not None:
            return out
        if kind.rows_over == "pairs":
            return _symmetric(out, self.shapes.n, reshape=reshape, shape=self.full_shape)
        if reshape or kind.per_point:
            return out.reshape(self.full_shape)
        if kind.per_sample:
            out = out.reshape(self.shapes.batch, self.shapes.m, self.shapes.n)
        return out

    def _gather(self, wanted: np.ndarray | None, *, verify: bool) -> np.ndarray:
        """Rows ``wanted`` (distinct; ``None`` = all) into one array, in that order.

        Every needed part is checked (committed, present, its footer matching
        the manifest) before the output is allocated: nothing is allocated from
        the manifest's numbers alone.
        """
        for index, _, _ in self.plan if wanted is None else self._shards_for(wanted):
            self._require(index, verify=False)
        count = self.shapes.total_rows if wanted is None else len(wanted)
        out = np.empty((count, self.shapes.n), dtype=NUMPY_FLOAT[self.dtype])
        if wanted is not None:
            order = np.argsort(wanted, kind="stable")
            sorted_rows = wanted[order]
        filled = 0
        for row_idx, block in self.iter_blocks(wanted, verify=verify):
            # NOTE: one copy per value, Arrow's buffer into ``out``: raw
            # ``pq.read_table`` + ``combine_chunks`` + ``to_numpy`` copies once too.
            if wanted is not None:
                out[order[np.searchsorted(sorted_rows, row_idx)]] = block
            elif int(row_idx[-1]) - int(row_idx[0]) + 1 == len(row_idx):
                out[int(row_idx[0]) : int(row_idx[0]) + len(row_idx)] = block  # a slice, no gather
            else:
                out[row_idx] = block
            filled += len(row_idx)
        if filled != count:
            raise JacpipeError(f"{self.storage.display}: expected {count} rows, found {filled}")
        return out

    def read_samples(self, sample: Any, *, verify: bool = True, reshape: bool = False) -> Any:
        """Whole samples of a batched result as numpy: ``(m, n)`` for one, ``(k, m, n)`` for k."""
        s = self.shapes
        if not kind_of(s.kind).per_sample:
            raise JacpipeError(
                f"sample=: only batched results have samples; this one is kind {s.kind!r} "
                "(read rows instead)"
            )
        picked = np.asarray(sample)
        if picked.size and (picked.dtype == np.bool_ or picked.dtype.kind not in "iu"):
            raise JacpipeError(f"sample={sample!r}: expected an integer or integers")
        picked = picked.astype(np.int64)
        one = picked.ndim == 0
        picked = picked.reshape(-1)
        if picked.size and (picked.min() < 0 or picked.max() >= s.batch):
            raise JacpipeError(
                f"sample {picked[(picked < 0) | (picked >= s.batch)][0]} out of range: "
                f"the result has {s.batch} samples (0..{s.batch - 1})"
            )
        flat = (picked[:, None] * s.m + np.arange(s.m)).reshape(-1)
        out = self.read_dense(flat, verify=verify)
        block = tuple(s.out_shape) + tuple(s.in_shape) if reshape else (s.m, s.n)
        return out.reshape(block if one else (len(picked), *block))

    def read_sparse(self, rows: Any = None, *, verify: bool = True) -> Any:
        """A sparse result's rows as a ``scipy.sparse.csr_matrix``."""
        import scipy.sparse as sp

        wanted = self._normalize_rows(rows)
        shards = self.plan if wanted is None else self._shards_for(wanted)
        r_all, c_all, v_all = [], [], []
        for index, _, _ in shards:
            self._require(index, verify=False)
        for index, _, _ in shards:
            entry = self._require(index, verify=verify)
            table = pq.read_table(self.storage.path(entry.file), filesystem=self.storage.fs)
            lengths = numpy_view(table.column("cols").combine_chunks().value_lengths())
            rows_here = np.repeat(numpy_view(table.column("row")), lengths)
            cols = numpy_view(table.column("cols").combine_chunks().flatten())
            vals = numpy_view(table.column("values").combine_chunks().flatten())
            r_all.append(rows_here)
            c_all.append(cols)
            v_all.append(vals)
        r = np.concatenate(r_all) if r_all else np.zeros(0, np.int64)
        c = np.concatenate(c_all) if c_all else np.zeros(0, np.int64)
        v = np.concatenate(v_all) if v_all else np.zeros(0, NUMPY_FLOAT[self.dtype])
        mat = sp.csr_matrix((v, (r, c)), shape=self.shape)
        return mat if wanted is None else mat[wanted]

    def as_linear_operator(self, *, dtype: Any = None, verify: bool = False) -> Any:
        """The result as a ``scipy.sparse.linalg.LinearOperator``, streamed from its parts.

        ``matvec``, ``rmatvec``, ``matmat`` and ``rmatmat`` each read the parts
        once, one row group (dense) or one part (sparse) at a time: memory is
        O(block + m + n), so results larger than memory are usable by
        ``scipy.sparse.linalg.lsmr``, ``svds`` and the like. Batched results
        are the ``(B * m, n)`` matrix of their flat rows.

        Args:
            dtype: arithmetic dtype (default: the result's; ``float64`` upcasts
                each block as it is read).
            verify: check every part's sha256 once, now.

        Raises:
            JacpipeError: a shard is missing, uncommitted or corrupt.
        """
        from pipeline.store.linop import JacobianOperator

        problems = self.check(checksums=verify)
        if problems:
            raise JacpipeError(f"{self.storage.display}: {problems[0]}; rerun `jacpipe run`")
        return JacobianOperator(self, dtype=dtype)

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The result as a tensor (see :attr:`pipeline.core.shapes.Shapes.full_shape`)."""
        return self.shapes.full_shape

    def contract(self, u: Any, v: Any = None, *, verify: bool = True) -> np.ndarray:
        """``T[u, v, :]`` (``(n,)``) or ``T[u, :, :]`` (``(n, n)``) of a third-derivative result.

        Streams the stored rows ``(j, k)``, ``j <= k``, once, adding each row
        where the symmetric tensor ``T`` holds it (``T[j, k] = T[k, j]``):
        the ``(n, n, n)`` tensor is never formed.

        Args:
            u, v: vectors of ``n`` numbers (``v`` None: contract ``u`` only).
            verify: check each part's checksum first.

        Raises:
            JacpipeError: not a third-derivative result, or vectors of the wrong size.
        """
        from pipeline.core.pairs import pair_of_row

        s = self.shapes
        if kind_of(s.kind).rows_over != "pairs":
            raise JacpipeError(f"contract(): the result is kind {s.kind!r}; it contracts "
                               "third-derivative results (kind 'third') only")
        n = s.n
        vecs = [np.asarray(w, dtype=np.float64).reshape(-1) for w in (u, v) if w is not None]
        if any(w.size != n for w in vecs):
            raise JacpipeError(f"contract(): u and v need {n} entries each, got "
                               f"{[w.size for w in vecs]}")
        out = np.zeros((n,) if v is not None else (n, n))
        for rows, block in self.iter_blocks(verify=verify):
            j, k = pair_of_row(rows, n)
            block = block.astype(np.float64, copy=False)
            off = (j != k).astype(np.float64)
            if v is None:  # T[u, :, :][k] += u_j row, and [j] += u_k row off the diagonal
                np.add.at(out, k, vecs[0][j, None] * block)
                np.add.at(out, j, (off * vecs[0][k])[:, None] * block)
            else:
                weight = vecs[0][j] * vecs[1][k] + off * vecs[0][k] * vecs[1][j]
                out += weight @ block
        return out


def _symmetric(rows: np.ndarray, n: int, *, reshape: bool, shape: tuple[int, ...]) -> np.ndarray:
    """The ``(n, n, n)`` tensor of third derivatives from its rows over pairs ``j <= k``."""
    from pipeline.core.pairs import pair_of_row

    j, k = pair_of_row(np.arange(len(rows)), n)
    out = np.empty((n, n, n), dtype=rows.dtype)
    out[j, k] = rows
    out[k, j] = rows
    return out.reshape(shape) if reshape else out


def normalize_rows(rows: Any, total: int) -> np.ndarray | None:
    """Flat row indices of ``rows`` as numpy indexing means them (``None`` = all).

    Accepted: an integer, a sequence or array of integers, a slice, or a
    boolean mask of length ``total``. Anything else (floats, strings, a mask of
    another length) is refused, never rounded or reinterpreted.

    Raises:
        JacpipeError: ``rows`` is none of those, or an index is out of range.
    """
    if rows is None:
        return None
    if isinstance(rows, slice):
        if rows.step == 0:
            raise JacpipeError(
                f"rows={rows!r}: a slice step cannot be zero; "
                "give a positive or negative step, or leave it out"
            )
        try:
            return np.arange(total)[rows]
        except TypeError:
            raise JacpipeError(f"rows={rows!r}: a slice needs integer bounds") from None
    if isinstance(rows, (str, bytes)):
        raise JacpipeError(f"rows={rows!r}: {_ROWS_ACCEPTED}")
    try:
        arr = np.asarray(rows)
    except (ValueError, TypeError):
        raise JacpipeError(f"rows: {_ROWS_ACCEPTED}") from None
    if arr.dtype == np.bool_:
        if arr.ndim != 1 or len(arr) != total:
            raise JacpipeError(
                f"rows: a boolean mask must have one entry per row ({total}), "
                f"got shape {arr.shape}"
            )
        return np.flatnonzero(arr)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        shown = repr(rows) if len(repr(rows)) <= 60 else f"{arr.dtype} values"
        raise JacpipeError(f"rows={shown}: {_ROWS_ACCEPTED}")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.min() < 0 or arr.max() >= total:
        bad = arr[(arr < 0) | (arr >= total)][0]
        raise JacpipeError(f"row {bad} out of range: the result has {total} rows (0..{total - 1})")
    return arr


_ROWS_ACCEPTED = (
    "expected an integer, integers, a slice or a boolean mask with one entry per row"
)


def _schema_problem(meta: Any, layout: str, dtype: str, n: int) -> str | None:
    """How a part's footer schema differs from the manifest's ``dtype`` and width ``n``."""
    try:
        schema = meta.schema.to_arrow_schema()
        values = schema.field("values").type
    except (KeyError, pa.ArrowInvalid):
        return "corrupt (no 'values' column)"
    if layout_of(layout).fixed_width:
        if pa.types.is_fixed_size_list(values) and pa.types.is_floating(values.value_type):
            got = f"{values.value_type} rows of width {values.list_size}"
            if str(values.value_type) == _ARROW_NAME[dtype] and values.list_size == n:
                return None
        else:
            got = f"a {values} values column"
        return f"holds {got}, the manifest says {dtype} x {n}"
    if pa.types.is_list(values) and str(values.value_type) == _ARROW_NAME[dtype]:
        return None
    return f"holds a {values} values column, the manifest says sparse {dtype}"


#: Arrow's spelling of the manifest's dtypes.
_ARROW_NAME = {"float32": "float", "float64": "double"}


def _rows_problem(meta: Any, start: int, stop: int, *, exact: bool) -> str | None:
    """How a part's row count or ``row`` range differs from its planned ``[start, stop)``.

    ``exact``: the part holds every planned row (dense); else at most that many.
    """
    if meta.num_rows > stop - start or (exact and meta.num_rows != stop - start):
        return (
            f"holds {meta.num_rows} rows, the manifest says {stop - start} "
            f"(rows {start}..{stop})"
        )
    try:
        col = meta.schema.to_arrow_schema().get_field_index("row")
    except pa.ArrowInvalid:
        col = -1
    if col != 0:
        return "corrupt (no 'row' column)"
    lows, highs = [], []
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(0).statistics
        if stats is not None and stats.has_min_max:
            lows.append(stats.min)
            highs.append(stats.max)
    if lows and not start <= min(lows) <= max(highs) < stop:
        return f"holds rows {min(lows)}..{max(highs) + 1}, the manifest says rows {start}..{stop}"
    return None


def _to_numpy(out: Any, n: int) -> Any:
    del n
    return out.toarray() if hasattr(out, "toarray") else out


def _to_torch(out: Any, n: int) -> Any:
    import torch

    return torch.from_numpy(_to_numpy(out, n))


def _to_scipy(out: Any, n: int) -> Any:
    import scipy.sparse as sp

    return out if sp.issparse(out) else sp.csr_matrix(np.asarray(out).reshape(-1, n))


#: ``as_=`` of :meth:`JacobianResult.read`: how the array read is handed back.
_CONVERT = {"numpy": _to_numpy, "torch": _to_torch, "scipy": _to_scipy}


#: Row groups decoded at once by :meth:`JacobianResult.iter_blocks` (and so by
#: ``read_jacobian`` and the linear operator). A row group's values are one
#: column chunk, which pyarrow decodes on one thread: reading row groups on a
#: pool is what ``pq.read_table`` does too.
READ_THREADS = 2


def _read_group(
    path: str, fs: Any, meta: Any, group: int, n: int, sel: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, block)`` of one row group (only the rows in ``sel`` when given)."""
    pf = pq.ParquetFile(path, filesystem=fs, metadata=meta)
    table = pf.read_row_group(group, columns=["row", "values"], use_threads=False)
    row_idx = numpy_view(table.column("row"))
    block = _fixed_list_to_numpy(table.column("values"), n)
    if sel is not None:
        keep = np.isin(row_idx, sel)
        row_idx, block = row_idx[keep], block[keep]
    return row_idx, block


def _prefetched(calls: Iterator[Callable[[], _T]], threads: int) -> Iterator[_T]:
    """Results of ``calls`` in order, up to ``threads`` of them running ahead on a pool."""
    if threads <= 1:
        for call in calls:
            yield call()
        return
    pending: deque[Future[_T]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="jacpipe-read") as pool:
        try:
            for call in calls:
                pending.append(pool.submit(call))
                if len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, n: int) -> np.ndarray:
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [numpy_view(c.flatten()).reshape(-1, n) for c in chunks]
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
