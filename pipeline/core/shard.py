"""What crosses the Ray boundary: the spec of one shard and what it reports back.

Both are frozen dataclasses with a JSON round-trip (``to_json`` /
``from_json``): the spec travels to a worker, the result is the shard's
manifest entry. Nothing else about a shard is passed around as a dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.kinds import Layout
from pipeline.core.shapes import Shapes
from pipeline.core.smoothing import Smoothing

#: Version of the on-disk format these specs produce (the manifest and parts).
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardSpec:
    """Everything a worker needs to compute rows ``[start, stop)`` and write their part.

    Args:
        job, params: the job spec and its typed parameters (rebuilt on the worker).
        fingerprint: the driver's fingerprint of the build; the worker checks its own.
        shapes: the derivative's shapes.
        index, start, stop: the shard and its flat row range.
        out: the result folder (URI; may hold credentials: never printed).
        method: ``rev``, ``fwd`` or ``sparse``.
        layout: ``dense`` or ``sparse`` (how the part stores rows).
        memory_budget: bytes the task may peak at.
        threads: torch threads of the task.
        device: ``auto``, ``cpu`` or ``cuda``.
        device_param: the job's ``build`` takes ``device`` (build on the GPU).
        run_id: the run that computes it.
        chunk_size: rows per vectorised pass, overriding the budget's choice.
        group_rows: rows per Parquet row group.
        compression: the part's Parquet codec (``zstd``, ``zstd:LEVEL``, ``lz4``, ``none``).
        compile: ``auto``, ``on`` or ``off``: torch.compile the sparse passes.
        smoothing: a smoothed run's settings, else None.
        forward: where forward mode disagrees with reverse mode: ``warn``,
            ``fallback`` or ``reverse`` (``pipeline.maths.checks.checking``).
        vectorise: False: rows one ``autograd.grad`` at a time (the run's
            vmap spot check found vectorised rows wrong).
    """

    job: str
    params: Mapping[str, Any]
    fingerprint: Mapping[str, Any]
    shapes: Shapes
    index: int
    start: int
    stop: int
    out: str
    method: str
    layout: Layout
    memory_budget: int
    threads: int
    device: str
    device_param: bool
    run_id: str
    group_rows: int
    chunk_size: int | None = None
    compression: str = "zstd"
    smoothing: Smoothing | None = None
    forward: str = "fallback"
    vectorise: bool = True
    compile: str = "auto"

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def part_meta(self) -> dict[str, Any]:
        """The JSON facts stored in the part file's schema metadata (self-describing file)."""
        return {
            "format_version": FORMAT_VERSION,
            "job": self.job,
            "params": dict(self.params),
            "shapes": self.shapes.to_json(),
            "dtype": self.shapes.dtype,
            "method": self.method,
            "compression": self.compression,
            "fingerprint": dict(self.fingerprint),
            "shard": {"index": self.index, "start": self.start, "stop": self.stop},
        } | ({"smoothing": self.smoothing.to_json()} if self.smoothing else {})

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["params"] = dict(self.params)
        out["fingerprint"] = dict(self.fingerprint)
        out["shapes"] = self.shapes.to_json()
        out["smoothing"] = self.smoothing.to_json() if self.smoothing else None
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShardSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["shapes"] = Shapes.from_json(d["shapes"])
        if kwargs.get("smoothing") is not None:
            kwargs["smoothing"] = Smoothing.from_json(kwargs["smoothing"])
        return cls(**kwargs)


@dataclass(frozen=True)
class ShardInputs:
    """What a worker receives beside its :class:`ShardSpec`: objects too big or too live for JSON.

    The driver puts one of these into Ray's object store once per run (every
    task of the run shares it); the in-process executor passes it directly.

    Args:
        pattern: the sparsity pattern (``scipy.sparse``, ``(m, n)``) of a
            sparse-layout run, else None.
        coloring: that pattern's :class:`~pipeline.sparse.coloring.Coloring`, else None.
        problem: a :class:`~pipeline.Problem` handed in memory
            (``pipeline.run(Problem(...))``) instead of a job to rebuild; the
            worker checks its fingerprint all the same.
    """

    pattern: Any = None
    coloring: Any = None
    problem: Any = None


@dataclass(frozen=True)
class ShardResult:
    """A committed shard: its manifest entry.

    Args:
        index, start, stop, rows: the shard and its row range.
        file: its part file; checksum (sha256 of its bytes) and bytes.
        nan, inf: non-finite values it holds.
        seconds: the task's wall time.
        compute_seconds, write_seconds: busy time computing rows (and copying
            them to the host) and encoding/writing them (0.0 in old manifests).
        node_id, device, gpu_ids, pid: where it ran.
        chunk_size: rows (or columns) per vectorised pass; peak_rss: the
            process's peak resident memory.
        run_id, attempt: which run computed it, and its attempt within that run.
        checks: what the engine's own checks reported while computing it (one
            line each: forward mode disagreeing, a wrong batching rule, a
            function that could not be vectorised).
    """

    index: int
    start: int
    stop: int
    file: str
    rows: int
    checksum: str
    bytes: int = 0
    nan: int = 0
    inf: int = 0
    seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    node_id: str = "?"
    device: str = "?"
    gpu_ids: list[str] = field(default_factory=list)
    chunk_size: int | None = None
    peak_rss: int | None = None
    pid: int | None = None
    run_id: str | None = None
    attempt: int = 1
    checks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShardResult:
        """Read a manifest entry (unknown keys are ignored, missing optional ones defaulted).

        Raises:
            KeyError, TypeError: a required key is missing.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
