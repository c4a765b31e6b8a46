"""Planning: every decision of a run, as a pure function of shapes, options and resources.

:func:`make_plan` turns what the user asked for (:class:`RunOptions`), what
the problem is (:class:`~pipeline.problem.problem.Shapes`, a sparsity pattern) and
what the cluster has (:class:`Resources`) into a :class:`RunPlan`: task
slots, shards, method, layout, colouring, memory budget, GPU share, row
groups. No torch, no Ray: it is tested with made-up resources, GPU rules
included. Chunk sizes are chosen later, on the worker, from the same
budget (:func:`chunk_rows`), because only the worker can measure what it holds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.codec import CODECS, DEFAULT_COMPRESSION, parse_compression  # noqa: F401
from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import Layout, Method, kind_of
from pipeline.core.options import RunOptions, format_size, parse_size
from pipeline.core.shapes import Shapes

if TYPE_CHECKING:
    from scipy.sparse import sparray as SparsePattern

    from pipeline.sparse.coloring import Coloring


def local_resources(num_cpus: int | None = None) -> Resources:
    """What an embedded Ray on this machine would offer, known without starting it.

    CPUs: ``num_cpus`` or the ones this process may run on; GPUs: what torch
    sees; memory: 70% of the available memory (Ray's default keeps 30% for
    its object store), read at most every :data:`MEMORY_READING_S` seconds.
    """
    import os
    import sys

    cpus = float(num_cpus or len(os.sched_getaffinity(0)) or os.cpu_count() or 1)
    gpus = 0.0
    torch = sys.modules.get("torch")  # the job was built: torch is imported when it matters
    if torch is not None and torch.cuda.is_available():
        gpus = float(torch.cuda.device_count())
    memory = int(_available_memory() * 0.7)
    return Resources(cpus=cpus, gpus=gpus, node_memory=memory, node_cpus=cpus, node_gpus=gpus)


#: Seconds a reading of the available memory serves planning: psutil's reading
#: (/proc/meminfo) cost 0.06 ms, as much as a tenth of a 100 x 100 Jacobian,
#: on every ``pipeline.jacobian`` call of a loop.
MEMORY_READING_S = 1.0
_MEMORY_READING: list[float] = [-math.inf, 0.0]  # [when (monotonic), bytes available]


def _available_memory() -> float:
    """Bytes of memory available now (psutil), reused for :data:`MEMORY_READING_S` seconds."""
    import time

    now = time.monotonic()
    if now - _MEMORY_READING[0] > MEMORY_READING_S:
        import psutil

        _MEMORY_READING[:] = [now, float(psutil.virtual_memory().available)]
    return _MEMORY_READING[1]


# NOTE: [Small jobs in process]
#   Starting an embedded Ray and its workers (each importing torch) costs
#   5-20 s on 2 cores, while a 100 x 100 Jacobian computes in milliseconds.
#   `--executor auto` runs the same shards (compute_shard, same parts, same
#   manifest, same resume) in the driver when the estimated work is below
#   LOCAL_MAX_SECONDS. The estimate: the driver's fingerprint times one
#   forward + backward pass (t); a vectorised pass over c rows costs about
#   c / ROWS_PER_PASS_TIME of t; writing costs bytes / WRITE_BYTES_PER_S.
LOCAL_MAX_SECONDS = 3.0
ROWS_PER_PASS_TIME = 16
WRITE_BYTES_PER_S = 150e6


def estimate_seconds(shapes: Shapes, plan: RunPlan, pass_seconds: float) -> float:
    """A rough single-process time for the whole run (see NOTE: [Small jobs in process])."""
    if plan.coloring is not None:
        passes = plan.coloring.num_colors * len(plan.shards) * ROWS_PER_PASS_TIME
    elif plan.method == "fwd":
        passes = shapes.n * (1 if kind_of(shapes.kind).per_sample else len(plan.shards))
        passes *= shapes.batch or 1
    else:
        passes = shapes.total_rows
    stored = stored_row_bytes(shapes, plan.pattern) * shapes.total_rows
    return pass_seconds * passes / ROWS_PER_PASS_TIME + stored / WRITE_BYTES_PER_S


@dataclass(frozen=True)
class Resources:
    """What the cluster offers (from ``ray.cluster_resources()`` and ``ray.nodes()``).

    The per-node maxima matter: a task asking more than any one node has is
    never scheduled (Ray waits forever), whatever the cluster's total.
    """

    cpus: float
    gpus: float = 0.0
    node_memory: int = 0  # the smallest node's memory, bytes (0: unknown)
    node_cpus: float = 0.0  # most CPUs on one node
    node_gpus: float = 0.0  # most GPUs on one node


@dataclass(frozen=True)
class RunPlan:
    """Every decision of a run (see :func:`make_plan`).

    Args:
        slots: shard tasks that run at once.
        shards: the row ranges, one part file each.
        method: ``rev``, ``fwd`` or ``sparse``.
        layout: ``dense`` or ``sparse``.
        memory_budget: bytes per task.
        cpus_per_shard, gpus_per_shard: Ray resources per task.
        threads: torch threads per task.
        device: where tasks compute (``cpu`` when no GPU is given to them).
        group_rows: rows per Parquet row group.
        compression: the part files' codec (``--compression``).
        coloring: the colouring of a sparse run, else None.
        pattern: its sparsity pattern, else None.
        pattern_source: ``job``, ``file``, ``detected`` or ``detected-local``.
        notes: lines for the user (clamped requests, the sparse summary).
        executor: ``ray`` (Ray tasks) or ``local`` (this process).
        forward: what a shard does where forward mode disagrees with reverse
            mode (:func:`pipeline.maths.checks.checking`): ``warn`` (``--method
            fwd``), ``fallback`` (reverse mode instead), ``reverse`` (the
            run's check disagreed: reverse mode wherever a path may choose).
        vectorise: False when the run's vmap spot check found vectorised rows
            wrong: shards compute rows one ``autograd.grad`` at a time.
    """

    slots: int
    shards: list[Shard]
    method: Method
    layout: Layout
    memory_budget: int
    cpus_per_shard: float
    gpus_per_shard: float
    threads: int
    device: str
    group_rows: int
    coloring: Coloring | None = None
    pattern: SparsePattern | None = None
    notes: list[str] = field(default_factory=list)
    pattern_source: str | None = None
    compression: str = DEFAULT_COMPRESSION
    executor: str = "ray"
    forward: str = "fallback"
    vectorise: bool = True

    def coloring_facts(self) -> dict[str, Any] | None:
        """The colouring as the manifest records it (None for dense runs)."""
        if self.coloring is None:
            return None
        return {
            "mode": self.coloring.mode,
            "num_colors": int(self.coloring.num_colors),
            "nnz": int(self.pattern.nnz),
            "pattern_sha256": pattern_hash(self.pattern),
            "source": self.pattern_source,
        }


def make_plan(
    shapes: Shapes,
    options: RunOptions,
    resources: Resources,
    *,
    pattern: Any = None,
    device_param: bool = False,
    forward_disagrees: str | None = None,
    pattern_source: str | None = None,
    pass_seconds: float | None = None,
    vectorise: bool = True,
) -> RunPlan:
    """Plan a run: slots, shards, method, layout, colouring, budget, GPU share, executor.

    Args:
        shapes: the derivative's shapes.
        options: what the user asked for.
        resources: what the cluster has.
        pattern: the sparsity pattern to use (:func:`run_pattern`), or None.
        device_param: the job's ``build`` takes a ``device`` (it can build on a GPU).
        pattern_source: where ``pattern`` came from (:class:`PatternChoice`).
        forward_disagrees: why forward mode gives another derivative than
            reverse mode at ``x`` (the adjoint check failed), else None:
            ``auto`` then keeps reverse mode, an explicit ``fwd`` is warned,
            a sparse run uses a row colouring (Hessians: reverse-over-reverse
            products).
        vectorise: False when the run's vmap spot check found vectorised
            rows wrong (the shards then go one row at a time).
        pass_seconds: one forward + backward pass of the job, timed, for an
            embedded run: ``--executor auto`` then runs a few seconds of work
            in this process (NOTE: [Small jobs in process]). None on a
            cluster, whose shards always run as Ray tasks.

    Returns:
        The :class:`RunPlan`.

    Raises:
        JacpipeError: a request the cluster or the job cannot satisfy.
    """
    gpus = gpu_share(options, resources, device_param=device_param)
    slots = task_slots(options.cpus_per_shard, gpus, resources)
    budget = (
        parse_size(options.memory_budget)
        if options.memory_budget
        else default_memory_budget(resources.node_memory or 8 * 2**30, slots)
    )
    sparse = pattern is not None and options.method in ("auto", "sparse")
    coloring = _worth_coloring(pattern, shapes, options, pattern_source) if sparse else None
    sparse = coloring is not None
    coloring, forward_note = _reverse_if_forward_disagrees(coloring, pattern, forward_disagrees)
    row_bytes = stored_row_bytes(shapes, pattern if sparse else None)
    shards, note = plan_shards(
        shapes.total_rows,
        # NOTE: a sparse shard evaluates fn on all of x once per colour whatever
        # its rows, so more shards than task slots only repeats that work.
        shards=(
            min(slots, shapes.total_rows)
            if sparse and options.shards is None and options.rows_per_shard is None
            else options.shards
        ),
        rows_per_shard=options.rows_per_shard,
        row_bytes=row_bytes,
        workers=slots,
        align=shapes.m if kind_of(shapes.kind).per_sample else 1,
    )
    notes = [note] if note else []
    if not vectorise:
        notes.append("warning: vectorised rows differ from plain autograd's (a torch batching "
                     "rule is wrong for an op in fn; see the manifest's vmap_check): rows "
                     "computed one at a time with torch.autograd.grad")
    if pattern is not None and not sparse and options.method == "auto":
        notes.append("the detected pattern needs about as many colours as dense passes; "
                     "dense path")
    if sparse:
        method, layout = "sparse", "sparse"
        notes.append(
            f"sparse: {int(pattern.nnz)} nonzeros, {coloring.num_colors} colours "
            f"({coloring.mode} mode) instead of {min(shapes.m, shapes.n)} dense passes"
        )
        notes.extend([forward_note] if forward_note else [])
    else:
        # Per-sample rows: every sample's rows sit in (about) one shard, so per
        # sample rev costs m VJPs and fwd n JVPs.
        per = 1 if kind_of(shapes.kind).per_sample else len(shards)
        method = (choose_method(options.method, m=shapes.m, n=shapes.n, shards=per)
                  if kind_of(shapes.kind).jacobian_rows else _taylor_method(options, shapes))
        layout = "dense"
        if method == "fwd" and forward_disagrees:
            if options.method == "auto":
                method = "rev"
                notes.append(f"reverse mode, not forward: {forward_disagrees}")
            else:
                notes.append(f"warning: --method fwd although {forward_disagrees}")
    plan = RunPlan(
        slots=slots,
        shards=shards,
        method=method,
        layout=layout,
        memory_budget=budget,
        cpus_per_shard=options.cpus_per_shard,
        gpus_per_shard=gpus,
        threads=max(1, int(math.floor(options.cpus_per_shard))),
        device="cpu" if gpus == 0 else options.device,
        group_rows=group_rows(row_bytes, 1),
        coloring=coloring,
        pattern=pattern if sparse else None,
        pattern_source=pattern_source if sparse else None,
        notes=notes,
        compression=options.compression,
        forward="warn" if options.method == "fwd" else "reverse" if forward_disagrees
        else "fallback",
        vectorise=vectorise,
    )
    return _with_executor(plan, shapes, options.executor, pass_seconds)


def _reverse_if_forward_disagrees(coloring: Coloring | None, pattern: Any, why: str | None
                                  ) -> tuple[Coloring | None, str | None]:
    """A sparse run's colouring where forward mode gives another derivative (``why``).

    A column colouring (one JVP per colour) becomes a row colouring (one
    VJP per colour); a Hessian's colours are kept and its products are
    computed by reverse-over-reverse autograd instead of forward-over-reverse
    (the shards' ``reverse`` policy). Returns the colouring and one note.
    """
    if coloring is None or why is None or coloring.mode == "rev":
        return coloring, None
    if coloring.mode == "symmetric":
        return coloring, ("Hessian-vector products by reverse-over-reverse autograd, not "
                          f"forward-over-reverse: {why}")
    from pipeline.sparse.coloring import Coloring, row_coloring

    colors = row_coloring(pattern)
    rows = Coloring(colors=colors, num_colors=int(colors.max()) + 1 if colors.size else 0,
                    mode="rev")
    return rows, f"row colouring (reverse mode), not column colouring (forward mode): {why}"


def _taylor_method(options: RunOptions, shapes: Shapes) -> Method:
    """Kinds computed by Taylor mode (per-point operators, third derivatives) have one method."""
    if options.method not in ("auto", "rev"):
        raise JacpipeError(
            f"--method {options.method}: the {shapes.kind} kind is computed by Taylor mode "
            "(one method, rev: a reverse pass or none over each row's jet); use --method auto"
        )
    return "rev"


def _with_executor(plan: RunPlan, shapes: Shapes, asked: str, pass_seconds: float | None
                   ) -> RunPlan:
    """``plan`` with its executor: ``asked``, else the estimate's (``ray`` on a cluster).

    ``--executor local`` runs in this process even where Ray is up (an
    ``--address`` with it is refused by :meth:`RunOptions.check`).
    """
    if asked == "local":
        return dataclasses.replace(plan, executor="local")
    if pass_seconds is None:
        return dataclasses.replace(plan, executor="ray")
    if asked != "auto":
        return dataclasses.replace(plan, executor=asked)
    estimate = estimate_seconds(shapes, plan, pass_seconds)
    if estimate > LOCAL_MAX_SECONDS:
        return dataclasses.replace(plan, executor="ray")
    note = (f"executor: local (about {estimate:.1f}s of work, less than starting Ray; "
            "--executor ray to use Ray)")
    return dataclasses.replace(plan, executor="local", notes=[*plan.notes, note])


def _worth_coloring(pattern: Any, shapes: Shapes, options: RunOptions,
                     source: str | None) -> Any:
    """The colouring of ``pattern``, or None where a detected one does not pay.

    NOTE: a known pattern beats both dense modes: one compressed pass per
    colour instead of one per row (rev) or column (fwd). A pattern that
    ``--method auto`` detected on its own is used only when its colours are
    fewer than half the dense passes (``min(m, n)``): a vectorised dense pass
    is cheaper than a compressed one.
    """
    from pipeline.sparse.coloring import choose_coloring

    coloring = choose_coloring(pattern, symmetric=kind_of(shapes.kind).symmetric)
    automatic = options.method == "auto" and not options.sparsity and source == "detected"
    if automatic and 2 * coloring.num_colors >= min(shapes.m, shapes.n):
        return None
    return coloring


def stored_row_bytes(shapes: Shapes, pattern: Any = None) -> int:
    """Bytes one row takes in a part file: dense values, or (int64 column, value) pairs."""
    if pattern is None:
        return shapes.n * shapes.itemsize
    return max(1, int(pattern.nnz) // max(shapes.m, 1)) * (8 + shapes.itemsize)


def gpu_share(options: RunOptions, resources: Resources, *, device_param: bool) -> float:
    """GPUs per shard task: the request checked against the cluster and the job.

    By default 1 when the cluster has GPUs and the job can build on one
    (a job without a ``device`` parameter builds on the CPU: a GPU would idle).

    Raises:
        JacpipeError: more than the cluster or a node has, a GPU the job
            cannot use, or ``--device cuda`` without a GPU.
    """
    _check_device(options, resources, device_param=device_param)
    share = options.gpus_per_shard
    if share is None:
        usable = resources.gpus > 0 and options.device != "cpu" and device_param
        share = 1.0 if usable else 0.0
    _check_gpu_share(share, options, resources, device_param=device_param)
    return share


def _check_device(options: RunOptions, resources: Resources, *, device_param: bool) -> None:
    if options.device == "cuda" and resources.gpus == 0:
        raise JacpipeError(
            "--device cuda: the Ray cluster has no GPUs (cluster resources: "
            f"{resources.cpus:g} CPUs, 0 GPUs); use --device cpu or a cluster with GPUs"
        )
    if options.device == "cuda" and not device_param:
        raise JacpipeError(
            f"--device cuda: job {options.job!r} has no `device` parameter, so its problem is "
            "built on the CPU; add `device: str = \"cpu\"` to its build() (see jobs/mlp.py) "
            "or use --device auto/cpu"
        )


def _check_gpu_share(
    share: float, options: RunOptions, resources: Resources, *, device_param: bool
) -> None:
    gpus, node_gpus = resources.gpus, resources.node_gpus
    if not share >= 0 or share > max(gpus, 0) and share > 0:
        raise JacpipeError(f"--gpus-per-shard {share:g}: the cluster has {gpus:g} GPUs")
    if share > node_gpus:
        raise JacpipeError(
            f"--gpus-per-shard {share:g}: no node has that many (at most "
            f"{node_gpus:g} GPUs on one node, {gpus:g} in the cluster); a shard runs on one node"
        )
    if share > 1 and not float(share).is_integer():
        raise JacpipeError(
            f"--gpus-per-shard {share:g}: Ray accepts fractions of one GPU "
            "(e.g. 0.5) or whole numbers, not fractions above 1"
        )
    if options.device == "cuda" and share == 0:
        raise JacpipeError(
            "--device cuda with --gpus-per-shard 0: a shard computes on a GPU only when "
            "Ray gives it one; give --gpus-per-shard > 0 or leave it out"
        )
    if share > 0 and not device_param and options.device != "cpu":
        raise JacpipeError(
            f"--gpus-per-shard {share:g}: job {options.job!r} has no `device` "
            "parameter, so its problem is built on the CPU and cannot use a GPU; add "
            "`device: str = \"cpu\"` to its build() (see jobs/mlp.py) or leave "
            "--gpus-per-shard out"
        )


def task_slots(cpus_per_shard: float, gpus_per_shard: float, resources: Resources) -> int:
    """How many shard tasks run at once on the cluster.

    Raises:
        JacpipeError: ``cpus_per_shard`` is not positive or more than a node has.
    """
    cpus, node_cpus = resources.cpus, resources.node_cpus
    if not cpus_per_shard > 0 or cpus_per_shard > cpus:
        raise JacpipeError(f"--cpus-per-shard {cpus_per_shard:g}: the cluster has {cpus:g} CPUs")
    if cpus_per_shard > node_cpus:
        raise JacpipeError(
            f"--cpus-per-shard {cpus_per_shard:g}: no node has that many (at most "
            f"{node_cpus:g} CPUs on one node, {cpus:g} in the cluster); a shard runs on one node"
        )
    slots = max(1, int(cpus // cpus_per_shard))
    if gpus_per_shard > 0:
        slots = min(slots, max(1, int(resources.gpus // gpus_per_shard)))
    return slots


def pattern_hash(pattern: Any) -> str:
    """sha256 of a pattern's structure (shape, indptr, indices), for the manifest."""
    import hashlib

    import numpy as np

    csr = pattern.tocsr()
    h = hashlib.sha256()
    h.update(np.asarray(csr.shape, dtype=np.int64).tobytes())
    h.update(np.asarray(csr.indptr, dtype=np.int64).tobytes())
    h.update(np.asarray(csr.indices, dtype=np.int64).tobytes())
    return h.hexdigest()

#: Default target size of one part file; a shard bigger than this is split.
TARGET_PART_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of the result, written to ``part-{index:05d}.parquet``."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(
    total_rows: int,
    *,
    shards: int | None = None,
    rows_per_shard: int | None = None,
    row_bytes: int = 0,
    workers: int = 1,
    align: int = 1,
) -> tuple[list[Shard], str | None]:
    """Split ``[0, total_rows)`` into contiguous shards.

    Args:
        total_rows: rows of the result.
        shards: number of shards (``--shards``).
        rows_per_shard: rows per shard (``--rows-per-shard``); exclusive with ``shards``.
        row_bytes: bytes of one stored row, to keep part files near
            :data:`TARGET_PART_BYTES` when neither option is given.
        workers: parallel slots; the default makes at least two shards per slot.
        align: round shard boundaries to multiples of this (whole samples of a
            batched result) where the sizes allow.

    Returns:
        The shards, and a note for the user when a request was clamped.

    Raises:
        JacpipeError: ``shards`` or ``rows_per_shard`` below 1, or both given.
    """
    note = None
    if shards is not None and rows_per_shard is not None:
        raise JacpipeError("give --shards or --rows-per-shard, not both")
    if shards is not None and shards < 1:
        raise JacpipeError(f"--shards must be at least 1, got {shards}")
    if rows_per_shard is not None and rows_per_shard < 1:
        raise JacpipeError(f"--rows-per-shard must be at least 1, got {rows_per_shard}")
    if rows_per_shard is not None:
        shards = math.ceil(total_rows / rows_per_shard)
    elif shards is None:
        by_size = math.ceil(total_rows * row_bytes / TARGET_PART_BYTES) if row_bytes else 1
        slots = max(workers, 1)
        # A whole number of rounds: 5 shards on 2 workers leave one idle for a
        # fifth of the run (measured: 20.4 s instead of ~18.5 s end to end).
        shards = -(-max(2 * slots, by_size) // slots) * slots
        shards = min(shards, total_rows)
    if shards > total_rows:
        note = f"--shards {shards} is more than the {total_rows} rows; using {total_rows} shards"
        shards = total_rows
    if rows_per_shard is not None:
        bounds = list(range(0, total_rows, rows_per_shard)) + [total_rows]
    else:
        # Even split; the first `extra` shards get one more row (uneven sizes allowed).
        base, extra = divmod(total_rows, shards)
        bounds = [0]
        for i in range(shards):
            bounds.append(bounds[-1] + base + (1 if i < extra else 0))
        if align > 1 and total_rows // align >= shards:
            bounds = [min(total_rows, round(b / align) * align) for b in bounds]
            bounds[-1] = total_rows
            bounds = sorted(set(bounds))
    out = [Shard(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
    return out, note


def default_memory_budget(total_memory: int, slots: int) -> int:
    """A sensible share of a node's memory per task: half of it, split over the slots."""
    return max(256 * 2**20, total_memory // (2 * max(slots, 1)))


# NOTE: [Chunk size from a memory budget]
#   One vectorised pass over c rows holds, per row: the basis row (m), the
#   result row (n), and the batched cotangents (rev) or tangents (fwd) of every
#   differentiable intermediate of fn (a, counted by
#   engine.intermediate_numel: NOT the tensors autograd saves, which all rows
#   share and which are already in the baseline). With itemsize s the pass
#   needs about  c * s * (m + n + a) * SAFETY  bytes; SAFETY covers the
#   backward kernels' temporaries and the copy that makes a column-major block
#   row-major for the writer. The shard also keeps the writer's row group
#   (`group_bytes`), and forward mode keeps its whole (rows, n) result. What
#   the process already holds (interpreter, torch, Ray, the problem) is
#   measured, not guessed, and subtracted from the budget; so is WRITER_BYTES,
#   what Parquet writing adds on first use (code, zstd contexts: 48 MiB
#   measured), which the first shard's baseline cannot contain yet.
#
#   Within the budget, bigger is not faster: a pass whose working set
#   c * s * (m + n + a) outgrows the caches streams every intermediate through
#   memory. Measured on 2 cores (benchmarks/engine.py, heat N=64, float64,
#   4096 rows): 64 rows per pass 0.42 s, 177 (this model) 0.53 s, 256 rows
#   0.58 s, all at once 1.6 s (jacrev 1.57 s). Matmul-bound MLPs prefer big
#   passes (mlp 2000: 2000 rows 44 ms, 1000 rows 50 ms), so the cap is a
#   compromise. CACHE_BYTES caps the working set; MIN_CHUNK keeps matrix
#   products efficient.
SAFETY = 2.0
WRITER_BYTES = 64 * 2**20
CACHE_BYTES = 128 * 2**20
MIN_CHUNK = 32


def chunk_rows(
    *,
    budget: int,
    baseline: int,
    m: int,
    n: int,
    activations: int,
    itemsize: int,
    group_bytes: int,
    method: str = "rev",
    rows: int = 0,
    cache_bytes: int | None = CACHE_BYTES,
    in_flight: int = 0,
) -> int:
    """Rows (``rev``) or columns (``fwd``) per vectorised pass under ``budget`` bytes.

    Args:
        budget: bytes this process may peak at (``--memory-budget``).
        baseline: bytes it holds already (measured RSS).
        m, n: rows and columns of the Jacobian.
        activations: elements of fn's differentiable intermediates per basis
            vector (:func:`pipeline.maths.engine.intermediate_numel`).
        itemsize: 4 or 8.
        group_bytes: what the Parquet writer holds (a row group and its copy).
        method: ``rev`` (chunk over rows) or ``fwd`` (chunk over columns).
        rows: rows of the shard; ``fwd`` keeps all of them until written.
        cache_bytes: cap of one pass's working set (see the NOTE); ``None``
            means budget only.
        in_flight: finished blocks the pipelined worker may hold on the host
            while the next is computed (queued or being encoded); each holds
            ``chunk x n`` values (``rev``).

    Returns:
        The chunk size; at most the budget allows, never below 1.

    Raises:
        JacpipeError: the budget does not leave room for even one row.
    """
    kept = rows * n * itemsize if method == "fwd" else 0
    free = budget - baseline - group_bytes - kept - WRITER_BYTES
    width = itemsize * (m + n + activations)
    per = width * SAFETY + in_flight * n * itemsize
    if free < per:
        raise JacpipeError(
            f"--memory-budget {format_size(budget)} is too small: the worker already "
            f"holds {format_size(baseline)} and one row needs "
            f"{format_size(per + group_bytes + kept + WRITER_BYTES)}; "
            f"give at least {format_size(baseline + per + group_bytes + kept + WRITER_BYTES)}"
        )
    by_budget = max(1, int(free // per))
    if cache_bytes is None:
        return by_budget
    return min(by_budget, max(MIN_CHUNK, int(cache_bytes // width)))


def group_rows(n: int, itemsize: int, target: int = 32 * 2**20) -> int:
    """Rows per Parquet row group of ``n`` entries of ``itemsize`` bytes: tens of MiB per group."""
    return max(1, target // max(1, n * itemsize))


# NOTE: [Cost model: forward or reverse mode]
#   Reverse mode costs one VJP per row: the whole result costs ~ m passes in
#   total, split across shards. Forward mode costs one JVP per input column,
#   but every shard needs all n columns to get its rows: ~ n * shards passes.
#   A JVP and a VJP cost about the same (a small constant times one forward
#   pass), so forward mode wins when n * shards < m / FWD_MARGIN. The margin
#   keeps square-ish problems on the reverse path, where vmap over VJPs also
#   reuses one recorded forward pass. Measured (benchmarks/engine.py, 2 cores):
#   m = 50,000, n = 16: fwd 69 ms, rev ~15 s; m = n = 2000: rev 44 ms, fwd 78 ms.
#   Hessians and per-sample Jacobians use the same rule with their own m and n.
FWD_MARGIN = 2.0


def choose_method(method: str, *, m: int, n: int, shards: int) -> str:
    """Resolve ``auto`` to ``rev`` or ``fwd`` by the cost model above.

    Raises:
        JacpipeError: unknown method.
    """
    if method in ("rev", "fwd"):
        return method
    if method != "auto":
        raise JacpipeError(f"--method must be auto, rev or fwd, got {method!r}")
    return "fwd" if n * max(shards, 1) * FWD_MARGIN < m else "rev"
