"""What a user asks of a run: :class:`RunOptions`, the options of ``jacpipe run`` and ``run``.

Pure values and their checks: no torch, no Ray. The planner
(:mod:`pipeline.runner.plan`) turns them into a plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.codec import DEFAULT_COMPRESSION, parse_compression
from pipeline.core.errors import JacpipeError

DEVICES = ("auto", "cpu", "cuda")


EXECUTORS = ("auto", "ray", "local")


METHODS = ("auto", "rev", "fwd", "sparse")


DTYPES = ("float32", "float64")


@dataclass
class RunOptions:
    """Everything ``jacpipe run`` accepts (see ``jacpipe run --help``)."""

    job: str
    params: list[str] = field(default_factory=list)
    out: str | None = None
    shards: int | None = None
    rows_per_shard: int | None = None
    address: str | None = None
    num_cpus: int | None = None
    cpus_per_shard: float = 1.0
    gpus_per_shard: float | None = None
    device: str = "auto"
    dtype: str | None = None
    method: str = "auto"
    memory_budget: str | None = None
    chunk_size: int | None = None
    sparsity: str | None = None
    resume: bool = True
    overwrite: bool = False
    max_in_flight: int | None = None
    progress: bool = True
    shard_timeout: float | None = None
    #: ``local`` runs the shards in this process, ``ray`` as Ray tasks, ``auto``
    #: picks ``local`` for a few seconds of work without ``--address``
    #: (default: ``$JACPIPE_EXECUTOR`` or ``auto``).
    executor: str = field(default_factory=lambda: _default_executor())
    compression: str = DEFAULT_COMPRESSION
    #: Randomized smoothing (pipeline.maths.smoothing): sigma (a number, "auto" or a
    #: .npy file of per-input sigmas), samples K, estimator, seed of the draws.
    smooth: float | str | None = None
    samples: int = 64
    estimator: str = "first"
    smooth_seed: int = 0

    def check(self) -> None:
        """Refuse option values that are wrong whatever the job and cluster.

        Raises:
            JacpipeError: one line naming the option, what arrived and what is allowed.
        """
        if self.out is not None and not str(self.out).strip():
            raise JacpipeError(
                "--out is empty; give a folder (or s3:// URI), or leave --out out for out/JOB"
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise JacpipeError(f"--chunk-size must be at least 1, got {self.chunk_size}")
        if self.device not in DEVICES:
            raise JacpipeError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise JacpipeError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.method not in METHODS:
            raise JacpipeError(
                f"--method must be auto, rev or fwd (or sparse, given a pattern), "
                f"got {self.method!r}"
            )
        if self.num_cpus is not None and self.num_cpus < 1:
            raise JacpipeError(f"--num-cpus must be at least 1, got {self.num_cpus}")
        if self.memory_budget is not None:
            parse_size(self.memory_budget)
        if self.executor not in EXECUTORS:
            raise JacpipeError(f"--executor must be auto, ray or local, got {self.executor!r}")
        if self.executor == "local" and self.address:
            raise JacpipeError("--executor local runs the shards in this process; it takes "
                               "no --address (use --executor ray or auto)")
        if self.shard_timeout is not None and not self.shard_timeout > 0:
            raise JacpipeError(f"--shard-timeout must be positive, got {self.shard_timeout}")
        parse_compression(self.compression)
        if self.smooth is not None:
            self.smoothing()
            if self.method == "sparse":
                raise JacpipeError("--smooth computes dense rows; use --method auto, rev or fwd")

    def smoothing(self) -> Any:
        """The :class:`~pipeline.core.smoothing.Smoothing` asked for, or None.

        Raises:
            JacpipeError: a bad --smooth, --samples or --estimator.
        """
        from pipeline.core.smoothing import parse_smooth

        return parse_smooth(self.smooth, samples=self.samples, seed=self.smooth_seed,
                            estimator=self.estimator)


def _default_executor() -> str:
    import os

    return os.environ.get("JACPIPE_EXECUTOR", "auto")


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
