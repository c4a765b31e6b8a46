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
) -> int:
    """Rows (``rev``) or columns (``fwd``) per vectorised pass under ``budget`` bytes.

    Args:
        budget: bytes this process may peak at (``--memory-budget``).
        baseline: bytes it holds already (measured RSS).
        m, n: rows and columns of the Jacobian.
        activations: elements of fn's differentiable intermediates per basis
            vector (:func:`pipeline.engine.intermediate_numel`).
        itemsize: 4 or 8.
        group_bytes: what the Parquet writer holds (a row group and its copy).
        method: ``rev`` (chunk over rows) or ``fwd`` (chunk over columns).
        rows: rows of the shard; ``fwd`` keeps all of them until written.
        cache_bytes: cap of one pass's working set (see the NOTE); ``None``
            means budget only.

    Returns:
        The chunk size; at most the budget allows, never below 1.

    Raises:
        JacpipeError: the budget does not leave room for even one row.
    """
    kept = rows * n * itemsize if method == "fwd" else 0
    free = budget - baseline - group_bytes - kept - WRITER_BYTES
    width = itemsize * (m + n + activations)
    per = width * SAFETY
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
    """Rows per Parquet row group: tens of MiB per group."""
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
