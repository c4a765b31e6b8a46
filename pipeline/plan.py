"""Planning: shards of output rows, chunk sizes from a memory budget, and the cost model.

Pure Python (no torch, no Ray) so it is cheap to import and easy to test.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.errors import JacpipeError

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

    @property
    def file(self) -> str:
        return f"part-{self.index:05d}.parquet"


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
        shards = max(2 * max(workers, 1), by_size)
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


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Parse ``"2GiB"``, ``"512MiB"``, ``"1.5G"``, ``"1000000"`` into bytes.

    Raises:
        JacpipeError: not a size.
    """
    match = _SIZE.match(str(text))
    if not match:
        raise JacpipeError(f"memory size {text!r}: expected a number with a unit, e.g. 2GiB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise JacpipeError(f"memory size {text!r}: unknown unit")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise JacpipeError(f"memory size {text!r} must be positive")
    return value


def format_size(n: float) -> str:
    """Bytes as a short human string (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def default_memory_budget(total_memory: int, slots: int) -> int:
    """A sensible share of a node's memory per task: half of it, split over the slots."""
    return max(256 * 2**20, total_memory // (2 * max(slots, 1)))


# NOTE: [Chunk size from a memory budget]
#   One vectorised pass over c rows holds, per row: the basis row (m), the
#   result row (n), and the batched cotangents flowing back through the graph,
#   at most the size of the saved activations (a). With itemsize s the pass
#   needs about  c * s * (m + n + a) * SAFETY  bytes. The shard also keeps one
#   Parquet row group of output (`group` bytes) while writing. What the process
#   already holds (the interpreter, torch, the problem) is measured, not
#   guessed, and subtracted from the budget.
SAFETY = 2.0


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
) -> int:
    """Rows (``rev``) or columns (``fwd``) per vectorised pass under ``budget`` bytes.

    Raises:
        JacpipeError: the budget does not leave room for even one row.
    """
    free = budget - baseline - group_bytes
    if method == "fwd":
        # A JVP pass over c columns carries c tangents of every activation and
        # output, plus the shard's (rows, c) slice that is kept.
        per = itemsize * (n + m + activations) * SAFETY
    else:
        per = itemsize * (m + n + activations) * SAFETY
    if free < per:
        raise JacpipeError(
            f"--memory-budget {format_size(budget)} is too small: the worker already "
            f"holds {format_size(baseline)} and one row needs {format_size(per + group_bytes)}; "
            f"give at least {format_size(baseline + per + group_bytes)}"
        )
    return max(1, int(free // per))


def group_rows(n: int, itemsize: int, target: int = 32 * 2**20) -> int:
    """Rows per Parquet row group: tens of MiB per group."""
    return max(1, target // max(1, n * itemsize))


# NOTE: [Cost model: forward or reverse mode]
#   Reverse mode costs one VJP per row: the whole result costs ~ m passes in
#   total, split across shards. Forward mode costs one JVP per input column,
#   but every shard needs all n columns to get its rows: ~ n * shards passes.
#   A JVP and a VJP cost about the same (a small constant times one forward
#   pass), so forward mode wins when n * shards < m / FWD_MARGIN. The margin
#   keeps square-ish problems on the reverse path, where vmap over VJPs also
#   reuses one recorded forward pass. Hessians and per-sample Jacobians use the
#   same rule with their own m and n.
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
