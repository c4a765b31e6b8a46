"""Test-only jobs that inject faults: worker kills, slow shards, user exceptions, NaN/Inf.

Used as ``tests.faultjobs:NAME`` by the fault tests (``tests/faultruns.py``) and
``benchmarks/soak.py``. Each job is an ordinary deterministic problem (seeded
MLP) whose custom ``autograd.Function`` misbehaves in its backward pass, which
the worker runs once per chunk of rows. Coordination across worker processes
(and attempts) goes through marker files in the ``markers`` folder, a job
parameter, so that "only on the first attempt" survives the death of the
process that decided it.

The shard being computed is found by walking the Python stack up to
:func:`pipeline.runner.worker.compute_shard`: CPU autograd runs the backward pass on
the calling thread, so that frame is always there inside a worker.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable

import torch

from pipeline import Problem

#: Backward calls seen per (markers, run_id, shard) in this process.
_CALLS: dict[tuple[str, str, int], int] = {}


def current_spec():
    """The spec of the shard being computed in this process (``index``, ``run_id``, ``out``)."""
    from pipeline.runner.worker import current_shard

    return current_shard()


def _indices(text: str) -> set[int]:
    return {int(t) for t in str(text).replace(";", ",").split(",") if t.strip()}


def _claim(path: str, text: str) -> bool:
    """Create ``path`` exclusively holding ``text``; True for the one caller that created it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.write(fd, text.encode())
    os.fsync(fd)
    os.close(fd)
    return True


def _mlp(n: int, m: int, hidden: int, seed: int) -> tuple[object, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, n, generator=g, dtype=torch.float64) / n**0.5
    w2 = torch.randn(m, hidden, generator=g, dtype=torch.float64) / hidden**0.5
    x = torch.randn(n, generator=g, dtype=torch.float64)
    return (lambda v: w2 @ torch.tanh(w1 @ v)), x


def _identity_with_backward(
    backward: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The identity, with ``backward(grad)`` as its pullback (vmap-able: a fault hook)."""

    class Hooked(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(v: torch.Tensor) -> torch.Tensor:
            return v.clone()

        @staticmethod
        def setup_context(ctx: object, inputs: object, output: object) -> None:
            pass

        @staticmethod
        def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
            return backward(grad)

    return Hooked.apply


def crashy(
    n: int = 60,
    m: int = 48,
    hidden: int = 16,
    seed: int = 0,
    markers: str = "",
    kill: str = "",
    kill_chunk: int = 2,
    delay: float = 0.0,
    kill_always: bool = False,
) -> Problem:
    """MLP whose backward SIGKILLs its own worker on chunk ``kill_chunk`` of shards ``kill``.

    Args:
        markers: folder for marker files; ``killed-NNNNN`` records that shard
            NNNNN's worker was killed (never again, whatever the attempt). It
            holds the pid that died and the shard's temp files at that moment.
        kill: comma-separated shard indices whose first attempt dies.
        kill_chunk: which backward call (chunk) of the shard dies, from 1.
        delay: seconds slept in every backward call (a slow job).
        kill_always: kill on every attempt, not only the first.
    """
    mlp, x = _mlp(n, m, hidden, seed)
    doomed = _indices(kill)

    def backward(grad: torch.Tensor) -> torch.Tensor:
        if delay:
            time.sleep(delay)
        spec = current_spec()
        if spec is not None and markers:
            index = spec.index
            key = (markers, spec.run_id, index)
            _CALLS[key] = _CALLS.get(key, 0) + 1
            if index in doomed and _CALLS[key] == kill_chunk:
                temps = [
                    name for name in os.listdir(spec.out)
                    if name.startswith(f".part-{index:05d}.")
                ]
                marker = os.path.join(markers, f"killed-{index:05d}")
                if kill_always:
                    marker += f"-{os.getpid()}"
                if _claim(marker, json.dumps({"pid": os.getpid(), "temps": temps})):
                    os.kill(os.getpid(), signal.SIGKILL)
        return grad

    fault = _identity_with_backward(backward)
    return Problem(fn=lambda v: fault(mlp(v)), x=x)


def raises_counted(
    n: int = 40, m: int = 40, hidden: int = 8, seed: int = 0, markers: str = "", shard: int = 1
) -> Problem:
    """MLP whose backward raises ``ValueError`` in shard ``shard``, counting each raise.

    Every raise appends one line to ``markers/raised``, so a test can tell
    whether the shard was retried.
    """
    mlp, x = _mlp(n, m, hidden, seed)

    def backward(grad: torch.Tensor) -> torch.Tensor:
        spec = current_spec()
        if spec is not None and spec.index == shard:
            with open(os.path.join(markers, "raised"), "a") as f:
                f.write(f"{os.getpid()}\n")
            raise ValueError(f"boom: the user's backward failed in shard {shard}")
        return grad

    boom = _identity_with_backward(backward)
    return Problem(fn=lambda v: boom(mlp(v)), x=x)


def nonfinite(
    n: int = 30, m: int = 24, hidden: int = 8, seed: int = 0, nan_rows: str = "3",
    inf_rows: str = "10,11",
) -> Problem:
    """MLP plus the identity whose derivative is NaN (``nan_rows``) or Inf (``inf_rows``).

    ``fn(x)`` itself is finite (so the fingerprint is), while row ``r`` of the
    Jacobian holds exactly one NaN or Inf, at column ``r``. The reference
    ``torch.autograd.functional.jacobian`` runs the same backward and gets the
    same non-finite entries.
    """
    if m > n:
        raise ValueError("nonfinite needs m <= n")
    mlp, x = _mlp(n, m, hidden, seed)
    scale = torch.ones(m, dtype=torch.float64)
    scale[sorted(_indices(nan_rows))] = float("nan")
    scale[sorted(_indices(inf_rows))] = float("inf")

    def backward(grad: torch.Tensor) -> torch.Tensor:
        # Only the rows a cotangent actually reaches turn non-finite (0 * NaN is NaN).
        return torch.where(grad != 0, grad * scale, torch.zeros_like(grad))

    odd = _identity_with_backward(backward)
    return Problem(fn=lambda v: mlp(v) + odd(v[:m]), x=x)


def slow_shard(
    n: int = 20, m: int = 24, hidden: int = 8, seed: int = 0, shard: int = 1, seconds: float = 8.0
) -> Problem:
    """MLP whose backward sleeps ``seconds`` (per chunk) in shard ``shard`` only: a straggler."""
    mlp, x = _mlp(n, m, hidden, seed)

    def backward(grad: torch.Tensor) -> torch.Tensor:
        spec = current_spec()
        if spec is not None and spec.index == shard:
            time.sleep(seconds)
        return grad

    slow = _identity_with_backward(backward)
    return Problem(fn=lambda v: slow(mlp(v)), x=x)
