"""Small things every built-in job shares: dtype names and seeded generators."""

from __future__ import annotations

import torch

from pipeline import JacpipeError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def dtype_of(name: str) -> torch.dtype:
    """``"float32"``/``"float64"`` to a torch dtype.

    Raises:
        JacpipeError: any other name.
    """
    try:
        return DTYPES[name]
    except KeyError:
        raise JacpipeError(f"dtype must be float32 or float64, got {name!r}") from None


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: every worker draws the same numbers."""
    return torch.Generator().manual_seed(int(seed))


def positive(name: str, value: int) -> int:
    """Check a size parameter.

    Raises:
        JacpipeError: ``value < 1``.
    """
    if value < 1:
        raise JacpipeError(f"parameter {name!r} must be at least 1, got {value}")
    return value
