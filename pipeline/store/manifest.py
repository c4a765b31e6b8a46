"""The manifest: a run's facts and its commit record, read, validated and written as one type.

``OUT/_manifest.parquet`` holds what was computed (job, params,
fingerprint, shapes, method, layout, plan, colouring), how (options,
versions), and one entry per committed shard. A shard is committed when its
entry, with the sha256 of its part, is here.

NOTE: [Manifest container]
    The manifest document (JSON, format_version 1) is the schema metadata
    (key ``jacpipe.manifest``) of a Parquet file with no row groups and the
    parts' schema. Polars reads a folder only when every file in it is
    Parquet (it skips neither ``_`` nor ``.`` names, unlike pyarrow, pandas
    and Spark), so a ``_manifest.json`` made ``pl.read_parquet(OUT)`` fail; a
    row-less file of the same schema adds no rows to any reader, and
    pyarrow, pandas and Spark skip it by its ``_`` anyway. Results written
    with ``_manifest.json`` (before this change) still read and resume; a
    resume rewrites the manifest in the new container. Only JSON is ever
    decoded from it: nothing is unpickled or executed when it is read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import LAYOUTS, Layout, kind_of, layout_of
from pipeline.core.shapes import Shapes
from pipeline.core.shard import FORMAT_VERSION, ShardResult
from pipeline.core.smoothing import Smoothing
from pipeline.store.parts import part_name
from pipeline.store.storage import Storage

MANIFEST = "_manifest.parquet"
#: Where results written before the Parquet container keep their manifest.
LEGACY_MANIFEST = "_manifest.json"
#: Schema-metadata key of the manifest document in ``MANIFEST``.
MANIFEST_KEY = b"jacpipe.manifest"
#: The commit log next to the manifest: one JSON line per committed shard
#: (local folders), or one ``_commit-NNNNN.json`` object per shard (object
#: stores, which cannot append). Both start with ``_``: readers of the
#: Parquet files skip them.
COMMIT_LOG = "_commits.jsonl"
COMMIT_OBJECT = "_commit-"
#: Keys whose equality makes a folder's result "the same run" (resumable).
IDENTITY = ("job", "params", "fingerprint", "method", "layout", "plan", "coloring", "smoothing")


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


@dataclass
class Manifest:
    """The facts of a run and its committed shards (see the module docstring).

    Args:
        job, params, fingerprint: what was built.
        method, layout: how rows were computed and stored.
        plan: ``(start, stop)`` of every shard, in index order.
        shapes: the derivative's shapes (kind, dtype, in/out shapes).
        coloring: ``mode``, ``num_colors``, ``nnz``, ``pattern_sha256`` of a
            sparse run, else None.
        options: budget, CPUs/GPUs per shard, device, row group size.
        shards: committed shards by index.
        status: ``running``, ``complete``, ``interrupted`` or ``failed``.
        smoothing: a smoothed run's settings (they decide the parts' schema), else None.
        extra: any other keys (kept as they are when rewritten).
    """

    job: str
    params: dict[str, Any]
    fingerprint: dict[str, Any]
    method: str
    layout: Layout
    plan: list[tuple[int, int]]
    shapes: Shapes
    coloring: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    shards: dict[int, ShardResult] = field(default_factory=dict)
    status: str = "running"
    run_id: str = ""
    created: str = ""
    updated: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    wall_seconds: float | None = None
    compute_seconds: float | None = None
    smoothing: Smoothing | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- facts ------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.shapes.kind

    @property
    def dtype(self) -> str:
        return self.shapes.dtype

    @property
    def committed(self) -> list[ShardResult]:
        """Committed shards in index order."""
        return [self.shards[i] for i in sorted(self.shards)]

    @property
    def nan(self) -> int:
        return sum(s.nan for s in self.shards.values())

    @property
    def inf(self) -> int:
        return sum(s.inf for s in self.shards.values())

    def identity(self) -> dict[str, Any]:
        """What must be equal for a folder to hold the same run (JSON values)."""
        doc = self.to_json()
        return {k: doc[k] for k in IDENTITY if k in doc}

    def commit(self, result: ShardResult) -> None:
        """Record a shard (replacing an earlier entry of the same index: rows exactly once)."""
        self.shards[result.index] = result

    # -- JSON -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "job": self.job,
            "params": self.params,
            "fingerprint": self.fingerprint,
            "method": self.method,
            "layout": self.layout,
            "plan": [[int(a), int(b)] for a, b in self.plan],
        }
        if self.coloring is not None:
            doc["coloring"] = self.coloring
        if self.smoothing is not None:
            doc["smoothing"] = self.smoothing.to_json()
        doc.update(
            kind=self.kind,
            shapes=self.shapes.to_json(),
            dtype=self.dtype,
            options=self.options,
            shards=[entry_json(s) for s in self.committed],
            status=self.status,
            run_id=self.run_id,
            created=self.created,
            versions=self.versions,
            updated=self.updated,
        )
        if self.status == "complete":
            doc.update(wall_seconds=self.wall_seconds, compute_seconds=self.compute_seconds,
                       nan=self.nan, inf=self.inf)
        doc.update(self.extra)
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Manifest:
        """Validate and read a parsed manifest.

        A reader must never index a missing key or trust a shard entry that
        does not describe exactly its planned rows and file: a hand-edited or
        bit-rotted manifest is one clear error, not a traceback or a wrong read.

        Raises:
            ValueError: what is structurally wrong (the caller adds where).
        """
        if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a jacpipe manifest of format_version {FORMAT_VERSION}")
        shapes = _checked_shapes(doc.get("shapes"))
        plan = _checked_plan(doc.get("plan"), shapes.total_rows)
        shards = _checked_shards(doc.get("shards"), plan)
        layout = doc.get("layout", "dense")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}")
        known = set(cls.__dataclass_fields__) | {"format_version", "kind", "dtype", "nan", "inf"}
        return cls(
            job=str(doc.get("job", "?")),
            params=dict(doc.get("params") or {}),
            fingerprint=dict(doc.get("fingerprint") or {}),
            method=str(doc.get("method", "?")),
            layout=layout,
            plan=plan,
            shapes=shapes,
            coloring=doc.get("coloring"),
            options=dict(doc.get("options") or {}),
            shards=shards,
            status=str(doc.get("status", "?")),
            run_id=str(doc.get("run_id", "")),
            created=str(doc.get("created", "")),
            updated=str(doc.get("updated", "")),
            versions=dict(doc.get("versions") or {}),
            wall_seconds=doc.get("wall_seconds"),
            compute_seconds=doc.get("compute_seconds"),
            smoothing=_checked_smoothing(doc.get("smoothing")),
            extra={k: v for k, v in doc.items() if k not in known},
        )

    # -- storage ------------------------------------------------------------------
    @classmethod
    def read(cls, storage: Storage) -> Manifest | None:
        """The manifest of a folder, or ``None`` if it has none.

        Raises:
            JacpipeError: the manifest exists but is not a jacpipe manifest, or
                is corrupt (not Parquet or JSON, or entries that do not match
                its plan).
        """
        name, kind = MANIFEST, storage.kind(MANIFEST)
        if kind == "missing":  # a result written before the Parquet container?
            name, kind = LEGACY_MANIFEST, storage.kind(LEGACY_MANIFEST)
        where = storage.display.rstrip("/") + "/" + name
        if kind == "missing":
            return None
        if kind != "file":
            raise JacpipeError(
                f"{where} is a folder, not a jacpipe manifest; move it away or give another --out"
            )
        try:
            raw = storage.read_bytes(name)
            doc = json.loads(raw if name == LEGACY_MANIFEST else unwrap_manifest(raw))
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise JacpipeError(
                f"{where} is corrupt ({_unreadable(exc)}); its shards cannot "
                "be trusted: rerun `jacpipe run` with --overwrite to recompute the result"
            ) from None
        if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
            raise JacpipeError(
                f"{where}: not a jacpipe manifest of format_version {FORMAT_VERSION}"
            )
        try:
            manifest = cls.from_json(doc)
            for entry in read_commit_log(storage):
                manifest.commit(_checked_entry(entry, manifest.plan))
        except (ValueError, RecursionError) as exc:
            what = _unreadable(exc) if isinstance(exc, RecursionError) else str(exc)
            raise JacpipeError(
                f"{where} is corrupt ({what}); its shards cannot be trusted: "
                "rerun `jacpipe run` with --overwrite to recompute the result"
            ) from None
        return manifest

    def write(self, storage: Storage) -> None:
        """Rewrite the manifest atomically (readers see the old or the new one).

        The commit log is compacted into it: the log's entries are in ``shards``
        (see :meth:`read`), so the log is removed once the manifest is durable.
        A manifest of an older result (``_manifest.json``) is replaced.
        """
        self.updated = utcnow()
        try:
            storage.write_atomic(MANIFEST, wrap_manifest(self.to_json(), self.part_schema()))
        except OSError as exc:
            raise JacpipeError(
                f"cannot write {storage.display.rstrip('/')}/{MANIFEST} "
                f"({exc.strerror or exc}); the shards committed so far are in the commit "
                "log: free space (or fix permissions) and rerun the same command to resume"
            ) from None
        storage.delete(LEGACY_MANIFEST)
        clear_commit_log(storage)

    def part_schema(self) -> Any:
        """The Arrow schema of this result's part files."""
        return part_schema(self.shapes, self.layout, self.smoothing,
                           operator=self.fingerprint.get("operator"))


def _checked_smoothing(doc: Any) -> Smoothing | None:
    if doc is None:
        return None
    try:
        return Smoothing.from_json(doc)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"malformed smoothing settings ({exc})") from None


#: Per-point results store their points' coordinates (column ``x``) up to this dimension.
MAX_PLOT_DIM = 3


def part_schema(shapes: Shapes, layout: str, smoothing: Smoothing | None = None, *,
                operator: Mapping[str, Any] | None = None) -> Any:
    """The schema of every part of a result with these shapes, layout and smoothing.

    ``operator``: a per-point kind's options (the fingerprint's ``operator``):
    a stochastic estimate (``samples``) adds the ``stderr`` column.
    """
    from pipeline.store.parts import dense_schema, sparse_schema

    if not layout_of(layout).fixed_width:
        return sparse_schema(shapes.dtype)
    kind = kind_of(shapes.kind)
    extra: tuple[str, ...] = ()
    if smoothing is not None:
        extra = smoothing.columns[1:]
    elif kind.per_point:
        extra = ("value", "stderr") if (operator or {}).get("samples") else ("value",)
    coords = 1
    for s in shapes.in_shape:
        coords *= int(s)
    return dense_schema(shapes.n, shapes.dtype, index=kind.index_column, extra=extra,
                        coords=coords if kind.per_point and coords <= MAX_PLOT_DIM else 0)


def wrap_manifest(doc: Mapping[str, Any], schema: Any) -> bytes:
    """A manifest document as the bytes of ``MANIFEST`` (NOTE: [Manifest container])."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_metadata(schema.with_metadata({MANIFEST_KEY: json.dumps(doc, indent=1).encode()}),
                      sink)
    return sink.getvalue().to_pybytes()


def _unreadable(exc: BaseException) -> str:
    """Why a manifest's JSON could not be read, for a one-line "is corrupt (...)" error."""
    if isinstance(exc, RecursionError):
        return "nested too deeply to be a jacpipe manifest"
    what = "not valid JSON" if isinstance(exc, json.JSONDecodeError) else "unreadable"
    return f"{what}: {exc}"


def unwrap_manifest(raw: bytes) -> bytes:
    """The JSON document inside ``MANIFEST``'s bytes.

    Raises:
        ValueError: not a Parquet file, or one without a jacpipe manifest.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"not a Parquet file: {str(exc)[:120]}") from None
    doc = (schema.metadata or {}).get(MANIFEST_KEY)
    if doc is None:
        raise ValueError(f"a Parquet file without {MANIFEST_KEY.decode()!r} metadata")
    return doc


#: Limits no real result reaches; past them a manifest is taken as edited or
#: corrupt before anything is allocated from its numbers.
MAX_ROWS = 2**40
MAX_COLUMNS = 2**34


def _checked_shapes(doc: Any) -> Shapes:
    """The manifest's shapes, every field checked for type and range."""
    from pipeline.core.kinds import KINDS

    def dims(value: Any, name: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
        ):
            raise ValueError(f"'shapes.{name}' must be a list of non-negative integers")
        return tuple(value)

    if not isinstance(doc, dict):
        raise ValueError("bad or missing 'shapes'")
    if doc.get("kind") not in KINDS or doc.get("dtype") not in ("float32", "float64"):
        raise ValueError(f"'shapes' has kind {doc.get('kind')!r}, dtype {doc.get('dtype')!r}")
    batch = doc.get("batch")
    if kind_of(doc["kind"]).per_sample != isinstance(batch, int) or isinstance(batch, bool):
        raise ValueError(f"'shapes.batch' is {batch!r} for kind {doc['kind']!r}")
    shapes = Shapes(doc["kind"], dims(doc.get("in_shape"), "in_shape"),
                    dims(doc.get("out_shape"), "out_shape"), batch, doc["dtype"])
    if not 0 < shapes.total_rows <= MAX_ROWS or not 0 < shapes.n <= MAX_COLUMNS:
        raise ValueError(f"'shapes' gives {shapes.total_rows} x {shapes.n}: out of range")
    for key in ("m", "n", "total_rows"):
        if key in doc and doc[key] != getattr(shapes, key):
            raise ValueError(
                f"'shapes.{key}' is {doc[key]!r}, the shapes give {getattr(shapes, key)}"
            )
    return shapes


def _checked_plan(plan: Any, total: int) -> list[tuple[int, int]]:
    if not isinstance(plan, list) or not plan:
        raise ValueError("bad or missing 'plan'")
    edge = 0
    for i, bounds in enumerate(plan):
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or not all(isinstance(b, int) for b in bounds)
            or bounds[0] != edge
            or bounds[1] <= bounds[0]
        ):
            raise ValueError(f"plan entry {i} is {bounds!r}")
        edge = bounds[1]
    if edge != total:
        raise ValueError(f"the plan covers {edge} rows, the shapes say {total}")
    return [(a, b) for a, b in plan]


def _checked_shards(shards: Any, plan: list[tuple[int, int]]) -> dict[int, ShardResult]:
    if not isinstance(shards, list):
        raise ValueError("bad or missing 'shards'")
    out: dict[int, ShardResult] = {}
    for entry in shards:
        if isinstance(entry, dict) and entry.get("index") in out:
            raise ValueError(f"shard {entry['index']} is listed twice")
        result = _checked_entry(entry, plan)
        out[result.index] = result
    return out


def _checked_entry(entry: Any, plan: list[tuple[int, int]]) -> ShardResult:
    if not _entry_ok(entry, plan, {}):
        raise ValueError(
            f"shard entry {json.dumps(entry, default=str)[:120]} does not match the plan"
        )
    try:
        return ShardResult.from_json(entry)
    except TypeError as exc:
        raise ValueError(f"shard entry {entry.get('index')}: {exc}") from None


# NOTE: [Commit log]
#   Rewriting the whole manifest per committed shard is quadratic in shards
#   (measured before: 28 s of manifest writes at 2,000 shards, as long as the
#   compute). A commit appends one line to _commits.jsonl and fsyncs it: O(1).
#   The manifest is rewritten (the log compacted into it, then the log
#   removed) only at the start, the end and on resume. A crash mid-append
#   leaves at most a torn last line: it is ignored, its part is not
#   committed and is recomputed on resume. Readers merge an uncompacted log
#   (a killed run) into the manifest; later lines win, as later commits.


_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(ShardResult))


def entry_json(result: ShardResult) -> dict[str, Any]:
    """``result.to_json()`` without ``dataclasses.asdict``'s deep copy (3/4 of a commit's time).

    The fields are JSON scalars and one list of strings, written at once.
    """
    return {name: getattr(result, name) for name in _ENTRY_FIELDS}


#: Seconds between fsyncs of the commit log (see NOTE: [Group commit]).
COMMIT_SYNC_SECONDS = 0.25
_last_sync: dict[str, float] = {}


def append_commit(storage: Storage, result: ShardResult) -> None:
    """Commit one shard: append its entry to the commit log (NOTE: [Group commit]).

    NOTE: [Group commit]
        The line is in the OS's page cache when this returns, so a killed or
        crashed driver loses no commit. It is fsynced at most every
        COMMIT_SYNC_SECONDS (and the manifest that compacts the log is always
        fsynced): fsyncing every line cost 0.45 ms idle and 1.4 ms during a
        2,000-shard run on 2 cores (6.9% of its wall time). A power loss or
        kernel crash may drop the last COMMIT_SYNC_SECONDS of commits: their
        parts are then uncommitted and recomputed on resume, as a shard that
        finished just before a crash is; nothing wrong is ever trusted (a torn
        last line is ignored).
    """
    import os
    import time

    line = json.dumps(entry_json(result), separators=(",", ":"))
    if not storage.local:
        storage.write_atomic(f"{COMMIT_OBJECT}{result.index:05d}.json", line.encode())
        return
    path = storage.path(COMMIT_LOG)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        now = time.monotonic()
        if now - _last_sync.get(path, -COMMIT_SYNC_SECONDS) >= COMMIT_SYNC_SECONDS:
            os.fsync(f.fileno())
            _last_sync[path] = now


def read_commit_log(storage: Storage) -> list[Any]:
    """The entries of an uncompacted commit log, in commit order (a torn last line dropped).

    Raises:
        ValueError: a line before the last is not JSON (the log was edited).
    """
    if not storage.local:
        names = sorted(n for n in storage.listdir() if n.startswith(COMMIT_OBJECT))
        return [json.loads(storage.read_bytes(n)) for n in names]
    if not storage.exists(COMMIT_LOG):
        return []
    lines = storage.read_bytes(COMMIT_LOG).decode("utf-8", errors="replace").split("\n")
    entries = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1:]):
                raise ValueError(f"{COMMIT_LOG} line {i + 1} is not JSON") from None
    return entries


def clear_commit_log(storage: Storage) -> None:
    """Remove the commit log (after its entries are in the manifest)."""
    for name in storage.listdir():
        if name == COMMIT_LOG or name.startswith(COMMIT_OBJECT):
            storage.delete(name)


def _entry_ok(entry: Any, plan: list[tuple[int, int]], seen: Mapping[int, Any]) -> bool:
    try:
        index = entry["index"]
        return (
            isinstance(index, int)
            and 0 <= index < len(plan)
            and index not in seen
            and (entry["start"], entry["stop"]) == tuple(plan[index])
            and entry["rows"] == entry["stop"] - entry["start"]
            and entry["file"] == part_name(index)
            and isinstance(entry["checksum"], str)
            and len(entry["checksum"]) == 64
        )
    except (KeyError, TypeError):
        return False
