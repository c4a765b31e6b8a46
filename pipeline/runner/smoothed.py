"""The shard of a smoothed run: rows and their error bars, written through the part writer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.maths.kinds import maths_of
from pipeline.maths.smoothing import smoothed_blocks, smoothed_chunk

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.core.shard import ShardSpec
    from pipeline.problem.problem import Problem
    from pipeline.store.parts import PartWriter


def write_shard(writer: PartWriter, problem: Problem, spec: ShardSpec, chunk: int) -> None:
    """Write a smoothed shard: rows ``[spec.start, spec.stop)``, values and error bars.

    Args:
        writer: the shard's :class:`~pipeline.store.parts.PartWriter` (smoothed schema).
        problem: the rebuilt problem (a ``jacobian`` kind).
        spec: the :class:`~pipeline.core.shard.ShardSpec` (``smoothing`` set).
        chunk: the plain shard's rows per pass (divided here, see :func:`smoothed_chunk`).
    """
    smoothing = spec.smoothing
    engine_rows = maths_of(problem.kind).rows
    dtype = np.dtype(spec.shapes.dtype)

    def rows_at(point: Tensor, a: int, b: int) -> np.ndarray:
        blocks = [blk.detach().cpu().numpy() for _, blk in
                  engine_rows(problem.fn, point, a, b, chunk_size=b - a, method=spec.method)]
        return np.concatenate(blocks) if blocks else np.zeros((0, point.numel()))

    chunk = smoothed_chunk(chunk, smoothing, spec.shapes.itemsize)
    for a, cols in smoothed_blocks(problem.fn, problem.x, smoothing, rows_at, spec.start,
                                   spec.stop, chunk=chunk):
        writer.write_columns(a, {k: v.astype(dtype) for k, v in cols.items()})
