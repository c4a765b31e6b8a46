"""Smoothed results for people: the standard-error columns, summaries and suggestions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.smoothing import AUTO_FRACTION, ORDER, Smoothing, _numpy

if TYPE_CHECKING:
    from pipeline.store.reader import JacobianResult


def suggestion(job: str, params: Mapping[str, Any], x: Any, kinked: list[int]) -> str:
    """A ``--smooth`` command line for a result found to have kinks along ``kinked`` inputs.

    NOTE: the sigma offered is the ``auto`` scale of the kinked inputs
    (``AUTO_FRACTION * max(1, |x_j|)``): small enough to keep the bias on the
    smooth inputs low, large enough that K = 256 samples straddle the kink.
    """
    flat = np.abs(np.asarray(_numpy(x), dtype=np.float64).reshape(-1))
    sigma = AUTO_FRACTION * max(1.0, float(flat[kinked].max())) if kinked else AUTO_FRACTION
    args = "".join(f"-p {k}={v} " for k, v in params.items())
    return (
        f"to differentiate through the kink, smooth it: jacpipe run {job} {args}"
        f"--smooth {sigma:g} --samples 256 --out out/{job.split(':')[-1]}-smooth (the Jacobian of "
        "E[f(x + sigma w)] with a standard error per entry; a larger sigma trades bias for "
        "variance)"
    )


def read_column(result: JacobianResult, column: str, rows: Any = None) -> np.ndarray:
    """One extra column of a result (``stderr``, ``zeroth``, ``value``, ``x``) as ``(rows, width)``.

    Args:
        result: an open :class:`~pipeline.store.reader.JacobianResult`.
        column: the column.
        rows: flat row indices, or None for all committed rows in order.
    """
    import pyarrow.parquet as pq

    n = result.shapes.n
    parts_rows, parts = [], []
    for shard in sorted(result.committed, key=lambda s: s.start):
        table = pq.read_table(result.storage.path(shard.file), columns=["row", column],
                              filesystem=result.storage.fs)
        parts_rows.append(table.column("row").to_numpy())
        flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        parts.append(flat.reshape(table.num_rows, -1))
    all_rows = np.concatenate(parts_rows) if parts_rows else np.zeros(0, np.int64)
    block = np.concatenate(parts) if parts else np.zeros((0, n))
    if rows is None:
        return block
    where = {int(r): i for i, r in enumerate(all_rows)}
    return block[[where[int(r)] for r in np.asarray(rows).reshape(-1)]]


def summary(result: JacobianResult, good: list[Any], *, top: int = 8) -> dict[str, Any]:
    """What ``inspect`` shows of a smoothed result: its smoothing and its error bars.

    Streams one shard at a time (``values`` and ``stderr`` of its rows).

    Args:
        result: an open :class:`~pipeline.store.reader.JacobianResult` (dense, smoothed).
        good: the trusted shards.
        top: how many of the largest entries to list with their standard errors.

    Returns:
        ``describe``, ``stderr_max``, ``stderr_median`` (over all entries; the
        median of the per-shard medians when there are several shards),
        ``relative_stderr`` (``stderr_max / max |value|``), ``largest``
        (``[row, col, value, stderr]`` of the ``top`` largest |values|).
    """
    smoothing = result.manifest.smoothing
    best: list[tuple[float, int, int, float, float]] = []
    medians, se_max, v_max = [], 0.0, 0.0
    for shard in good:
        rows = np.arange(shard.start, shard.stop)
        values = result.read(rows, verify=False, as_="numpy")
        se = read_column(_Only(result, shard), "stderr")
        if not se.size:
            continue
        medians.append(float(np.median(se)))
        se_max, v_max = max(se_max, float(se.max())), max(v_max, float(np.abs(values).max()))
        flat = np.argsort(-np.abs(values), axis=None)[:top]
        for i, j in zip(*np.unravel_index(flat, values.shape), strict=True):
            best.append((abs(float(values[i, j])), int(rows[i]), int(j), float(values[i, j]),
                         float(se[i, j])))
    best = sorted(best, reverse=True)[:top]
    return {
        "describe": describe(smoothing),
        **smoothing.to_json(),
        "stderr_max": se_max,
        "stderr_median": float(np.median(medians)) if medians else None,
        "relative_stderr": se_max / v_max if v_max else None,
        "largest": [[r, c, v, e] for _, r, c, v, e in best],
    }


class _Only:
    """A view of a result with one committed shard (for :func:`read_column`)."""

    def __init__(self, result: JacobianResult, shard: Any) -> None:
        self.shapes, self.storage, self.committed = result.shapes, result.storage, [shard]


def describe(smoothing: Smoothing) -> str:
    """One line: sigma, K, estimator, seed."""
    if isinstance(smoothing.sigma, tuple):
        sigma = f"per input from {smoothing.source or 'a vector'}"
    elif smoothing.sigma == "auto":
        sigma = f"auto ({smoothing.fraction:g} * max(1, |x_j|))"
    else:
        sigma = f"{float(smoothing.sigma):g}"
    return (f"sigma {sigma}, K={smoothing.samples} ({smoothing.pairs} antithetic pairs), "
            f"{ORDER[smoothing.estimator]}, seed {smoothing.seed}")
