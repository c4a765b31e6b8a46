"""An eNTK written as a result folder: rows of ``K``, for ``inspect``, ``--svd``, the operator.

Each shard is a block of ``x1`` samples: its rows ``K[i O + o, :]`` are computed
by :func:`pipeline.maths.ntk.ntk` against all of ``x2`` and streamed into one
part, so a process holds one row block, never ``K``. The folder is a dense
result like any other: its ``shapes`` are a matrix's (kind ``jacobian``, rows
``N1 O``, columns ``N2 O``) and its fingerprint's ``ntk`` entry says what the
rows are (kernel, path, estimates, sizes). ``compare`` cannot rebuild it (the
model lives in Python, like a run of an in-memory ``Problem``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pipeline.core.errors import JacpipeError
from pipeline.core.shapes import Shapes
from pipeline.core.shard import ShardResult
from pipeline.maths.ntk import ntk
from pipeline.runner.plan import group_rows
from pipeline.store.folder import ResultFolder
from pipeline.store.manifest import Manifest
from pipeline.store.parts import PartWriter, dense_schema, part_name
from pipeline.store.storage import Storage


def write_ntk(model: Any, x1: Any, x2: Any = None, *, out: str, kernel: str = "full",
              method: str = "auto", samples_per_shard: int | None = None,
              memory_budget: int = 1 << 30, overwrite: bool = False) -> Manifest:
    """Compute the eNTK of ``model`` block by block and write its rows to ``out``.

    Args:
        model, x1, x2, kernel, method, memory_budget: as :func:`pipeline.ntk`.
        out: the result folder (local path or ``s3://`` URI).
        samples_per_shard: ``x1`` samples per shard (rows ``samples * O``, or
            ``samples`` for the trace and sum kernels); None: 8 shards at most.
        overwrite: replace an existing result in ``out``.

    Each shard computes its rows against all of ``x2`` (a symmetric kernel's
    half-of-the-blocks saving applies within a shard only); the path is chosen
    once, on the first sample's row block, and recorded in the fingerprint.

    Returns:
        The written :class:`~pipeline.store.manifest.Manifest`.

    Raises:
        JacpipeError: ``out`` holds another result and ``overwrite`` is off, or
            what :func:`pipeline.ntk` raises.
    """
    t0 = time.perf_counter()
    n1 = int(x1.shape[0])
    step = samples_per_shard or max(1, -(-n1 // 8))
    if step < 1:
        raise JacpipeError(f"write_ntk: samples_per_shard must be >= 1, got {step}")
    first, report = ntk(model, x1[:1], x2 if x2 is not None else x1, kernel=kernel,
                        method=method, memory_budget=memory_budget, report=True)
    per, n = int(first.shape[0]), int(first.shape[1])  # rows per sample, columns
    dtype = str(first.dtype).removeprefix("torch.")
    plan = [(a * per, min(a + step, n1) * per) for a in range(0, n1, step)]
    facts = {"kernel": kernel, "method": report.method, "estimates": report.estimates,
             "layers": report.layers, "n1": n1, "n2": n // per if kernel == "full" else n,
             "rows_per_sample": per, "symmetric": x2 is None}
    manifest = Manifest(
        job="python:ntk", params={}, fingerprint={"ntk": facts}, method=report.method,
        layout="dense", plan=plan, shapes=Shapes("jacobian", (n,), (n1 * per,), None, dtype),
        run_id=uuid.uuid4().hex[:12], options={"memory_budget": memory_budget})
    storage = Storage(out)
    folder = ResultFolder(storage)
    folder.prepare(manifest, resume=False, overwrite=overwrite)
    try:
        options = {"kernel": kernel, "method": report.method, "memory_budget": memory_budget}
        for index, (a, b) in enumerate(plan):
            t_block = time.perf_counter()
            block = ntk(model, x1[a // per:b // per], x2 if x2 is not None else x1, **options)
            folder.commit(_part(storage, manifest.run_id, index, a, block, t_block))
    except BaseException:
        folder.finish("failed")
        raise
    folder.finish("complete", wall_seconds=round(time.perf_counter() - t0, 3))
    assert folder.manifest is not None
    return folder.manifest


def _part(storage: Storage, run_id: str, index: int, a: int, block: Any, t0: float
          ) -> ShardResult:
    """Rows ``[a, a + len(block))`` of ``K`` as one committed part (``t0``: its start)."""
    rows = block.detach().cpu().numpy()
    writer = PartWriter(storage, part_name(index),
                        dense_schema(rows.shape[1], str(rows.dtype)),
                        {"shard": {"index": index, "start": a, "stop": a + len(rows)}},
                        group_rows=group_rows(rows.shape[1], rows.itemsize))
    try:
        writer.write(a, rows)
        info = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return ShardResult(index, a, a + len(rows), info.file, info.rows, info.checksum,
                       info.bytes, nan=info.nan, inf=info.inf,
                       seconds=round(time.perf_counter() - t0, 4), run_id=run_id)
