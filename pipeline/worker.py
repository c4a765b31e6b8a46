"""What one shard does, wherever it runs: rebuild, check, compute in chunks, write.

:func:`compute_shard` is a plain function of a JSON-able spec: the Ray task in
``runner.py`` is a thin wrapper around it, and tests call it directly.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import numpy as np
import torch

from pipeline import engine, plan
from pipeline.errors import JacpipeError
from pipeline.problem import Problem, Shapes, build_problem, check_fingerprint, fingerprint
from pipeline.store import PartWriter, Storage, dense_schema, sparse_schema

# One built problem per (job, params, device, driver fingerprint) per worker
# process: a worker that runs many shards builds once (weights, x, the measured
# activation size). The fingerprint is part of the key so that a worker kept
# from an earlier run checks its build again when the driver's build changed
# (a job whose code or data changed between runs), instead of reusing a stale one.
_CACHE: dict[str, tuple[Problem, int]] = {}


def _cache_key(spec: dict[str, Any], device: str) -> str:
    return json.dumps(
        [spec["job"], spec["params"], device, spec["fingerprint"]], sort_keys=True, default=str
    )


def activation_numel(problem: Problem) -> int:
    """Elements one basis vector carries through one vectorised pass (one sample).

    The differentiable intermediates of the forward pass (for Hessians, of the
    gradient's graph): see NOTE [Memory of one basis vector] in ``engine``.
    Saved weights are shared by every row and are already in the measured RSS.
    """
    if problem.kind == "hessian":

        def grad(t: torch.Tensor) -> torch.Tensor:
            (g,) = torch.autograd.grad(problem.fn(t).reshape(()), t, create_graph=True)
            return g

        return engine.intermediate_numel(grad, problem.x)
    if problem.kind == "batched":
        return engine.intermediate_numel(problem.fn, problem.x[0])
    return engine.intermediate_numel(problem.fn, problem.x)


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


def _problem(spec: dict[str, Any], device: str) -> tuple[Problem, int]:
    key = _cache_key(spec, device)
    if key not in _CACHE:
        params = dict(spec["params"])
        if device != "cpu" and spec.get("device_param"):
            params["device"] = device
        problem = build_problem(spec["job"], params)
        shapes = Shapes.from_json(spec["shapes"])
        check_fingerprint(spec["fingerprint"], fingerprint(problem, shapes))
        _CACHE[key] = (problem, activation_numel(problem))
    return _CACHE[key]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node id
        pass
    return "local"


def _attempt(storage: Storage, run_id: str, index: int) -> int:
    """Count this shard's attempts in this run by marker files (``.attempt-*``)."""
    prefix = f".attempt-{run_id}-{index:05d}-"
    earlier = sum(1 for name in storage.listdir() if name.startswith(prefix))
    storage.write_atomic(f"{prefix}{uuid.uuid4().hex[:8]}", b"")
    return earlier + 1


def compute_shard(
    spec: dict[str, Any], *, pattern: Any = None, coloring: Any = None
) -> dict[str, Any]:
    """Compute one shard and commit its part file; return its manifest entry.

    Args:
        spec: ``job``, ``params``, ``fingerprint``, ``shapes``, ``index``,
            ``start``, ``stop``, ``out``, ``method``, ``memory_budget`` (bytes),
            ``threads``, ``device``, ``run_id``, ``chunk_size`` (optional
            override), ``group_rows``, ``meta`` (JSON facts for the file).

    Returns:
        The shard's manifest entry (file, rows, checksum, bytes, seconds, the
        ``run_id`` that computed it and its ``attempt`` within that run, ...).
    """
    t0 = time.perf_counter()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = _device(spec.get("device", "auto"))
    storage = Storage(spec["out"])
    attempt = _attempt(storage, spec["run_id"], spec["index"])
    problem, activations = _problem(spec, device)
    shapes = Shapes.from_json(spec["shapes"])
    itemsize = 4 if shapes.dtype == "float32" else 8
    start, stop, index = int(spec["start"]), int(spec["stop"]), int(spec["index"])
    group_rows = int(spec["group_rows"])
    chunk = spec.get("chunk_size") or plan.chunk_rows(
        budget=int(spec["memory_budget"]),
        baseline=_rss() if device == "cpu" else 0,
        m=shapes.m,
        n=shapes.n,
        activations=activations,
        itemsize=itemsize,
        group_bytes=2 * group_rows * _stored_row_bytes(shapes.n, itemsize, pattern),
        method=spec["method"],
    )
    if spec["method"] == "rev":
        # A chunk never needs more rows than one row group: the writer flushes
        # whole groups, so larger chunks only raise the peak.
        chunk = min(chunk, max(group_rows, 1))
    meta = dict(spec.get("meta", {}), shard={"index": index, "start": start, "stop": stop})
    layout = spec.get("layout", "dense")
    schema = (
        sparse_schema(shapes.dtype)
        if layout == "sparse"
        else dense_schema(shapes.n, shapes.dtype, batched=shapes.kind == "batched")
    )
    writer = PartWriter(storage, f"part-{index:05d}.parquet", schema, meta, group_rows=group_rows)
    try:
        if layout == "sparse":
            _write_sparse(writer, problem, pattern, coloring, start, stop, chunk)
        else:
            blocks = engine.iter_rows(
                problem, start, stop, chunk_size=chunk, method=spec["method"]
            )
            for a, block in blocks:
                arr = block.detach().cpu().numpy()
                samples = None
                if shapes.kind == "batched":
                    samples = np.arange(a, a + len(arr), dtype=np.int64) // shapes.m
                writer.write(a, arr, samples=samples)
        info = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if info.rows != stop - start:
        raise RuntimeError(f"shard {index}: wrote {info.rows} rows, expected {stop - start}")
    return {
        "index": index,
        "start": start,
        "stop": stop,
        "file": info.file,
        "rows": info.rows,
        "checksum": info.checksum,
        "bytes": info.bytes,
        "nan": info.nan,
        "inf": info.inf,
        "seconds": round(time.perf_counter() - t0, 4),
        "node_id": _node_id(),
        "device": device,
        "gpu_ids": _gpu_ids(),
        "chunk_size": int(chunk),
        "peak_rss": _peak_rss(),
        "pid": os.getpid(),
        "run_id": spec["run_id"],
        "attempt": attempt,
    }


def _stored_row_bytes(n: int, itemsize: int, pattern: Any) -> int:
    """Bytes one row takes in a part file: dense values, or (column, value) pairs."""
    if pattern is None:
        return n * itemsize
    return max(1, int(pattern.nnz) // max(pattern.shape[0], 1)) * (8 + itemsize)


def _write_sparse(
    writer: PartWriter,
    problem: Problem,
    pattern: Any,
    coloring: Any,
    start: int,
    stop: int,
    chunk: int,
) -> None:
    """Compressed evaluation (one JVP/VJP/HVP per colour touching these rows)."""
    from pipeline import sparse

    if coloring is None:
        raise RuntimeError("a sparse shard needs the colouring of its pattern")
    rows = sparse.evaluate_rows(problem, start, stop, coloring, chunk_size=chunk, pattern=pattern)
    writer.write_sparse(rows.rows, rows.indptr, rows.cols, rows.values.detach().cpu().numpy())


def _ray_gpus() -> tuple[bool, list[str]]:
    """``(inside a Ray task, the GPU ids Ray gave it)``; ``(False, [])`` outside Ray."""
    try:
        import ray

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
