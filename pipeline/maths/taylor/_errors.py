"""The error and the warning Taylor mode raises."""

from __future__ import annotations

from pipeline.core.errors import JacpipeError


class TaylorError(JacpipeError):
    """Taylor mode refused: bad input, a function it cannot trace, or a random op."""


class RandomOpError(TaylorError):
    """``fn`` uses a random op: its derivatives change from call to call."""


class TaylorFallbackWarning(UserWarning):
    """An ATen op has no Taylor rule and is differentiated by nested forward mode (exact, slow).

    Raised once per op per process; the message names the op.
    """
