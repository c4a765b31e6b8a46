"""What one shard does, wherever it runs: rebuild, check, compute in chunks, write.

:func:`compute_shard` is a plain function of a :class:`~pipeline.core.shard.ShardSpec`:
the Ray task in ``runner.py`` is a thin wrapper around it, and tests call it directly.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import kind_of, layout_of
from pipeline.core.shard import ShardInputs, ShardResult, ShardSpec
from pipeline.maths import checks, engine
from pipeline.maths.kinds import iter_rows, maths_of
from pipeline.problem.problem import Problem, rebuild
from pipeline.runner import plan
from pipeline.store.folder import record_attempt
from pipeline.store.manifest import part_schema
from pipeline.store.parts import PartWriter, part_name, piece_rows
from pipeline.store.storage import Storage

# One built problem per (job, params, device, driver fingerprint) per worker
# process: a worker that runs many shards builds once (weights, x, the measured
# activation size). The fingerprint is part of the key so that a worker kept
# from an earlier run checks its build again when the driver's build changed
# (a job whose code or data changed between runs), instead of reusing a stale one.
# Bounded (CACHE_SIZE, oldest out): a worker kept by the embedded Ray across a
# Newton loop's calls meets a new fingerprint (a new x) at every call.
_CACHE: dict[str, tuple[Problem, int]] = {}
CACHE_SIZE = 4


#: The shard this process is computing (see :func:`current_shard`).
_CURRENT: ShardSpec | None = None


def current_shard() -> ShardSpec | None:
    """The spec of the shard being computed in this process, or None between shards.

    For a job's own diagnostics (and fault-injection tests): which shard, run
    and folder a call of ``fn`` belongs to.
    """
    return _CURRENT


def _cache_key(spec: ShardSpec, device: str) -> str:
    return json.dumps(
        [spec.job, dict(spec.params), device, dict(spec.fingerprint)], sort_keys=True, default=str
    )


def activation_numel(problem: Problem) -> int:
    """Elements one basis vector carries through one vectorised pass (one sample).

    The differentiable intermediates of the forward pass (for Hessians, of the
    gradient's graph): see NOTE [Memory of one basis vector] in ``engine``.
    Saved weights are shared by every row and are already in the measured RSS.
    """
    spec = kind_of(problem.kind)
    maths = maths_of(problem.kind)
    if maths.row_numel is not None:
        return maths.row_numel(problem)
    if spec.symmetric:
        # autograd's double backward (not torch.func.grad): it also counts
        # functions torch.func cannot transform, which rows then compute by
        # the autograd fallback.
        def grad(t: torch.Tensor) -> torch.Tensor:
            (g,) = torch.autograd.grad(problem.fn(t).reshape(()), t, create_graph=True)
            return g

        return engine.intermediate_numel(grad, problem.x)
    fn, x = maths.differentiated(problem)
    return engine.intermediate_numel(fn, x)


#: ``CUDA_VISIBLE_DEVICES`` when this process first used CUDA: torch keeps that
#: view for the life of the process, whatever Ray sets for later tasks.
_CUDA_VIEW: str | None = None


def _device(requested: str) -> str:
    """Where this shard computes: ``cuda`` or ``cpu``.

    ``cuda`` when Ray gave the task a GPU (or outside a Ray task) and torch
    sees one; else the CPU, also for ``auto`` on nodes whose GPUs torch cannot
    use (the manifest records the ``cpu`` fallback and the GPU ids Ray gave).

    Raises:
        JacpipeError: ``cuda`` was asked for and cannot be had here.
    """
    global _CUDA_VIEW
    in_task, ids = _ray_gpus()
    allowed = bool(ids) or not in_task
    if requested in ("auto", "cuda") and allowed and torch.cuda.is_available():
        if _CUDA_VIEW is None:
            _CUDA_VIEW = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return "cuda"
    if requested == "cuda":
        why = "Ray gave this task no GPU" if not allowed else "torch sees no CUDA device"
        raise JacpipeError(f"--device cuda: {why} on node {_node_id()[:12]}")
    return "cpu"


def _problem(spec: ShardSpec, device: str, given: Problem | None = None
             ) -> tuple[Problem, int]:
    """The shard's problem: rebuilt from its job (cached), or the one handed in memory.

    Either way it is checked against the driver's fingerprint first: a
    problem that pickles into something else (a closure over state that does
    not travel) is refused, never silently different.
    """
    key = _cache_key(spec, device)
    if key not in _CACHE:
        if given is not None:
            from pipeline.core.fingerprint import check_fingerprint
            from pipeline.problem.problem import fingerprint, validate

            check_fingerprint(spec.fingerprint, fingerprint(given, validate(given, spec.job)))
            problem = given
        else:
            params = dict(spec.params)
            if device != "cpu" and spec.device_param:
                params["device"] = device
            problem = rebuild(spec.job, params, spec.fingerprint)
        while len(_CACHE) >= CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = (problem, activation_numel(problem))
    return _CACHE[key]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _node_id() -> str:
    ray = sys.modules.get("ray")  # not imported: not in Ray (NOTE in _ray_gpus)
    if ray is None:
        return "local"
    try:
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node id
        pass
    return "local"


def compute_shard(
    spec: ShardSpec, inputs: ShardInputs | None = None, *, pipelined: bool = True,
) -> ShardResult:
    """Compute one shard and commit its part file; return its manifest entry.

    Args:
        spec: the shard (see :class:`~pipeline.core.shard.ShardSpec`).
        inputs: the pattern and colouring of a sparse layout, and a problem
            handed in memory instead of the job to rebuild (its fingerprint is
            checked all the same); see :class:`~pipeline.core.shard.ShardInputs`.
        pipelined: dense layout: write block ``k`` on a writer thread while block
            ``k + 1`` is computed (see :class:`_Pipeline`); ``False`` writes
            each block before computing the next. The part's bytes are the same.

    Returns:
        The shard's :class:`~pipeline.core.shard.ShardResult` (file, rows, checksum,
        bytes, seconds and the compute/write busy times, where it ran, the
        ``run_id`` that computed it and its ``attempt`` within that run, ...).
    """
    global _CURRENT
    inputs = inputs or ShardInputs()
    pattern, coloring = inputs.pattern, inputs.coloring
    t0 = time.perf_counter()
    torch.set_num_threads(spec.threads)  # Ray sets OMP_NUM_THREADS from num_cpus: be explicit
    device = _device(spec.device)
    storage = Storage(spec.out)
    attempt = record_attempt(storage, spec.run_id, spec.index)
    problem, activations = _problem(spec, device, inputs.problem)
    chunk = _chunk(spec, activations, pattern, baseline=_rss() if device == "cpu" else 0)
    writer = PartWriter(
        storage, part_name(spec.index), _schema(spec), spec.part_meta(),
        group_rows=spec.group_rows, compression=spec.compression, encoders=encoders(spec, device),
    )
    busy = {"compute": 0.0, "write": 0.0}
    reports: list[str] = []  # the engine's own checks (NOTE: [Checks on every engine call])
    _CURRENT = spec
    try:
        # the driver's adjoint check covered this very function and point, except
        # for per-sample kinds (other samples), and its vmap spot check this
        # function's batching rules: NOTE: [Checks on every engine call]
        with checks.checking(forward=spec.forward, vectorise=spec.vectorise, log=reports,
                             check_forward=kind_of(spec.shapes.kind).per_sample,
                             check_vmap=False):
            _write_rows(writer, problem, spec, pattern, coloring, chunk, busy, pipelined)
        t_commit = time.perf_counter()
        info = writer.commit()
        busy["write"] += time.perf_counter() - t_commit
    except BaseException:
        writer.abort()
        raise
    finally:
        _CURRENT = None
    if info.rows != spec.rows:
        raise RuntimeError(f"shard {spec.index}: wrote {info.rows} rows, expected {spec.rows}")
    return ShardResult(
        index=spec.index,
        start=spec.start,
        stop=spec.stop,
        file=info.file,
        rows=info.rows,
        checksum=info.checksum,
        bytes=info.bytes,
        nan=info.nan,
        inf=info.inf,
        seconds=round(time.perf_counter() - t0, 4),
        compute_seconds=round(busy["compute"], 4),
        write_seconds=round(busy["write"], 4),
        node_id=_node_id(),
        device=device,
        gpu_ids=_gpu_ids(),
        chunk_size=int(chunk),
        peak_rss=_peak_rss(),
        pid=os.getpid(),
        run_id=spec.run_id,
        attempt=attempt,
        checks=reports,
    )


def _write_rows(writer: PartWriter, problem: Problem, spec: ShardSpec, pattern: Any,
                coloring: Any, chunk: int, busy: dict[str, float], pipelined: bool) -> None:
    """The shard's rows, by its layout and kind, into ``writer`` (not yet committed)."""
    if not layout_of(spec.layout).fixed_width:
        _write_sparse(writer, problem, pattern, coloring, spec, chunk, busy)
    elif spec.smoothing:
        from pipeline.runner.smoothed import write_shard

        write_shard(writer, problem, spec, chunk)
    elif maths_of(problem.kind).columns is not None:
        _write_columns(writer, problem, spec, chunk, busy)
    else:
        _write_dense(writer, problem, spec, chunk, busy, pipelined=pipelined)


def compute_rows(spec: ShardSpec, inputs: ShardInputs | None = None) -> np.ndarray:
    """A dense shard's rows returned, not written: ``(rows, n)`` numpy.

    What ``pipeline.jacobian`` asks of Ray for a result that fits in memory:
    the same problem (rebuilt or handed in memory, its fingerprint checked),
    device, threads and chunk size as :func:`compute_shard`, its rows going
    back through Ray's object store instead of a part file.
    """
    inputs = inputs or ShardInputs()
    torch.set_num_threads(spec.threads)
    device = _device(spec.device)
    problem, activations = _problem(spec, device, inputs.problem)
    chunk = _chunk(spec, activations, None, baseline=_rss() if device == "cpu" else 0)
    out = np.empty((spec.rows, spec.shapes.n), dtype=str(spec.shapes.dtype))
    for a, block in iter_rows(problem, spec.start, spec.stop, chunk_size=chunk,
                              method=spec.method, m=spec.shapes.m, compile=spec.compile):
        out[a - spec.start:a - spec.start + len(block)] = (
            block.detach().reshape(len(block), -1).cpu().numpy())
    return out


def encoders(spec: ShardSpec, device: str = "cpu", host: tuple[int, int] | None = None) -> int:
    """Encoder threads of a shard: ``threads - 1`` (the rest computes), at least 1.

    A shard that computes on a GPU leaves the host's CPUs idle, and its run is
    bound by encoding (an H200 computed 8192 x 8192 in 0.015 s and took 0.84 s
    to write it): it encodes on its share of the host, ``CPUs / GPUs - 1``
    threads (``host``: the node's CPUs and GPUs, from Ray where it runs).
    """
    own = max(1, spec.threads - 1)
    if device != "cuda":
        return own
    cpus, gpus = host if host is not None else _host()
    return max(own, cpus // max(1, gpus) - 1)


def _host() -> tuple[int, int]:
    """The CPUs and GPUs of this node (Ray's totals where it runs, else this process's)."""
    node = _node_id()
    if node != "local":
        import ray

        for entry in ray.nodes():
            if entry.get("NodeID") == node:
                res = entry.get("Resources", {})
                return int(res.get("CPU", 1)), int(res.get("GPU", 1))
    return os.cpu_count() or 1, max(1, torch.cuda.device_count())


#: Finished blocks a dense shard holds on the host at most: one queued, one being
#: encoded (``plan.chunk_rows(in_flight=...)`` counts them).
IN_FLIGHT = 2


def _chunk(spec: ShardSpec, activations: int, pattern: Any, *, baseline: int) -> int:
    """Rows (rev) or columns (fwd) per vectorised pass: the override, else from the budget."""
    if spec.chunk_size:
        return spec.chunk_size
    shapes = spec.shapes
    fixed = layout_of(spec.layout).fixed_width
    stored = plan.stored_row_bytes(shapes, None if fixed else pattern)
    chunk = plan.chunk_rows(
        budget=spec.memory_budget,
        baseline=baseline,
        m=shapes.m,
        n=shapes.n,
        activations=activations,
        itemsize=shapes.itemsize,
        group_bytes=2 * spec.group_rows * stored,
        method=spec.method,
        # Forward-mode Jacobians keep every row of the shard until the last
        # column pass (engine NOTE: [Rows by forward mode]); Hessian and
        # per-sample rows are yielded chunk by chunk.
        rows=spec.rows if kind_of(shapes.kind).plain else 0,
        in_flight=IN_FLIGHT if layout_of(spec.layout).fixed_width else 0,
    )
    if spec.method == "rev":
        # A chunk never needs more rows than one row group: the writer flushes
        # whole groups, so larger chunks only raise the peak.
        chunk = min(chunk, max(spec.group_rows, 1))
    return chunk


def _schema(spec: ShardSpec) -> Any:
    return part_schema(spec.shapes, spec.layout, spec.smoothing,
                       operator=spec.fingerprint.get("operator"))


def _write_dense(
    writer: PartWriter,
    problem: Problem,
    spec: ShardSpec,
    chunk: int,
    busy: dict[str, float],
    *,
    pipelined: bool,
) -> None:
    """Compute the shard's rows block by block and hand each to the writer.

    ``busy`` gains the seconds spent computing (to the host copy's start) and
    writing (encoding, hashing, the sink), not the waits between them.
    """
    m = spec.shapes.m
    batched = kind_of(spec.shapes.kind).per_sample
    copier = _HostCopy(problem.x.device)

    def write(a: int, host: Any) -> None:
        arr = copier.wait(host)
        samples = np.arange(a, a + len(arr), dtype=np.int64) // m if batched else None
        writer.write(a, arr, samples=samples)

    sink: Any = _Pipeline(write) if pipelined else None
    try:
        ramp = _first_block_end(spec, chunk)
        pattern = hessian_pattern(problem)
        rows = itertools.chain(*(
            iter_rows(problem, a, b, chunk_size=c, method=spec.method, m=m, pattern=pattern,
                      compile=spec.compile)
            for a, b, c in ((spec.start, ramp, ramp - spec.start), (ramp, spec.stop, chunk))
            if b > a))
        while True:
            t0 = time.perf_counter()
            item = next(rows, None)
            if item is None:
                break
            host = copier.start(item[1])
            busy["compute"] += time.perf_counter() - t0
            if sink is None:
                t1 = time.perf_counter()
                write(item[0], host)
                busy["write"] += time.perf_counter() - t1
            else:
                sink.put(item[0], host)
            del item, host
    except BaseException:
        if sink is not None:
            sink.cancel()
        raise
    if sink is not None:
        busy["write"] += sink.close()


def _write_columns(writer: PartWriter, problem: Problem, spec: ShardSpec, chunk: int,
                   busy: dict[str, float]) -> None:
    """A kind whose rows have several columns (per-point operators): block by block."""
    columns = maths_of(problem.kind).columns
    index = kind_of(spec.shapes.kind).index_column
    m = spec.shapes.m
    t0 = time.perf_counter()
    for a, cols in columns(problem, spec.start, spec.stop, chunk_size=chunk, compile=spec.compile):
        host = {name: t.detach().cpu().numpy() for name, t in cols.items()}
        r = len(host["values"])
        if index is not None:
            host[index] = np.arange(a, a + r, dtype=np.int64) // m
        if "x" in writer.schema.names:  # the points, for plots over them
            host["x"] = problem.x[a:a + r].detach().reshape(r, -1).cpu().numpy()
        t1 = time.perf_counter()
        busy["compute"] += t1 - t0
        writer.write_columns(a, host)
        t0 = time.perf_counter()
        busy["write"] += t0 - t1


#: id of a problem -> (the problem, kept alive so the id stays its own; its Hessian pattern).
_HESSIAN_PATTERNS: dict[int, tuple[Problem, Any]] = {}


def hessian_pattern(problem: Problem) -> Any:
    """The Hessian pattern a third-derivative problem skips rows by (None: all rows)."""
    if not kind_of(problem.kind).hessian_pattern or problem.sparsity is None:
        return None
    if not isinstance(problem.sparsity, str):
        return problem.sparsity
    if id(problem) not in _HESSIAN_PATTERNS:
        from pipeline.sparse.detect import trace_sparsity

        report = trace_sparsity(problem.fn, problem.x, kind="hessian", mode="global",
                                max_density=None)
        _HESSIAN_PATTERNS[id(problem)] = (problem, report.pattern)  # None: gave up (dense)
    return _HESSIAN_PATTERNS[id(problem)][1]


def _first_block_end(spec: ShardSpec, chunk: int) -> int:
    """Where a dense shard's first block ends: one encoding piece in, in reverse mode.

    NOTE: [A small first block]
        A pipelined shard's writer idles until the first block is computed,
        and the encoder starts on whole pieces (parts NOTE: [Encoding
        pieces]). The first block is therefore one piece (140 rows of a
        20,000-column float32 part instead of a 419-row group: the shard's
        wall / max(compute, write) went from 1.22 to 1.11-1.17 on 2 cores,
        benchmarks/scale.py); the rest keep the budget's chunk, since small
        chunks slow matrix-bound functions (2,000 rows of an mlp n = 2,000
        float64: 0.30 s in 525-row chunks, 0.18 s in one). The two ranges
        cost one more forward pass. Per-sample rows end the block on a
        sample boundary. Forward mode computes every column before any
        row: no ramp.
    """
    piece = piece_rows(_schema(spec), spec.group_rows)
    if spec.method != "rev" or piece >= chunk:
        return spec.start
    end = spec.start + piece
    if kind_of(spec.shapes.kind).per_sample:
        end -= end % spec.shapes.m
    return end if spec.start < end < spec.stop else spec.start


class _HostCopy:
    """Blocks to host memory: on CUDA, pinned buffers filled on a side stream.

    The copy of block ``k`` runs on its own stream while block ``k + 1`` is
    computed on the default one; the writer thread waits for the copy's event
    before reading the buffer. On the CPU a block is already on the host.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = (
            torch.cuda.Stream(device) if device.type == "cuda" and torch.cuda.is_available()
            else None
        )

    def start(self, block: torch.Tensor) -> Any:
        block = block.detach()
        if self.stream is None or block.device.type != "cuda":
            return block.cpu().numpy()
        host = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(block.device))
        with torch.cuda.stream(self.stream):
            host.copy_(block, non_blocking=True)
            block.record_stream(self.stream)  # keep its memory until the copy ran
            done = torch.cuda.Event()
            done.record(self.stream)
        return host, done

    @staticmethod
    def wait(host: Any) -> np.ndarray:
        if isinstance(host, tuple):
            tensor, done = host
            done.synchronize()
            return tensor.numpy()
        return host


class _Pipeline:
    """A writer thread fed through a bounded queue: compute and writes overlap.

    At most :data:`IN_FLIGHT` finished blocks wait or are being written; the
    producer blocks when the queue is full. An exception on the writer thread
    is re-raised in the producer at its next :meth:`put` or at :meth:`close`,
    and the caller aborts the part.
    """

    _STOP = object()

    def __init__(self, write: Callable[[int, Any], None]) -> None:
        self._write = write
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=IN_FLIGHT - 1)
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self.busy = 0.0
        self._thread = threading.Thread(target=self._run, name="jacpipe-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP or self._cancel.is_set():
                return
            t0 = time.perf_counter()
            try:
                self._write(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the producer
                self._error = e
                self._cancel.set()
                return
            finally:
                self.busy += time.perf_counter() - t0
                del item

    def put(self, a: int, host: Any) -> None:
        while True:
            self._raise()
            try:
                self._queue.put((a, host), timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> float:
        """Wait for the last block; return the writer's busy seconds."""
        while self._thread.is_alive():
            try:
                self._queue.put(self._STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise()
        return self.busy

    def cancel(self) -> None:
        """Stop the writer after its current block (the shard failed elsewhere)."""
        self._cancel.set()
        try:
            self._queue.put_nowait(self._STOP)
        except queue.Full:
            pass
        self._thread.join()


def _write_sparse(
    writer: PartWriter,
    problem: Problem,
    pattern: Any,
    coloring: Any,
    spec: ShardSpec,
    chunk: int,
    busy: dict[str, float],
) -> None:
    """Compressed evaluation (one JVP/VJP/HVP per colour touching these rows), then its write.

    Not pipelined: a sparse shard is evaluated in one call (by colour, not by block).
    """
    from pipeline.sparse import compressed as sparse

    if coloring is None:
        raise RuntimeError("a sparse shard needs the colouring of its pattern")
    t0 = time.perf_counter()
    rows = sparse.evaluate_rows(problem, spec.start, spec.stop, coloring, chunk_size=chunk,
                                pattern=pattern, compile=spec.compile)
    values = rows.values.detach().cpu().numpy()
    t1 = time.perf_counter()
    writer.write_sparse(rows.rows, rows.indptr, rows.cols, values)
    busy["compute"] += t1 - t0
    busy["write"] += time.perf_counter() - t1


def _ray_gpus() -> tuple[bool, list[str]]:
    """``(inside a Ray task, the GPU ids Ray gave it)``; ``(False, [])`` outside Ray.

    A process that has not imported Ray is in no Ray task: importing it only
    to ask cost an in-process shard 0.4-0.9 s.
    """
    ray = sys.modules.get("ray")
    if ray is None:
        return False, []
    try:
        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            ids = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
            return ctx.get_task_id() is not None, ids
    except Exception:  # noqa: BLE001 - outside Ray there are no assigned GPUs
        pass
    return False, []


def _gpu_ids() -> list[str]:
    """The GPU ids this shard holds: Ray's assignment, or torch's if they differ.

    A reused worker (``max_calls=0``) may be given another GPU than the one
    torch opened for its first task; torch stays on the first one, and that
    is what is recorded then.
    """
    ids = _ray_gpus()[1]
    if _CUDA_VIEW and torch.cuda.is_initialized():
        view = [d.strip() for d in _CUDA_VIEW.split(",") if d.strip()]
        if ids and not set(ids) <= set(view):
            current = torch.cuda.current_device()
            return view[current : current + 1] or ids
    return ids


def _peak_rss() -> int:
    import resource

    # ru_maxrss is KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
