"""The one exception type a user can cause, and its exit codes."""

from __future__ import annotations


class JacpipeError(Exception):
    """An error the user can fix: bad job, bad parameter, bad folder, bad cluster.

    The CLI prints ``str(error)`` as one line and exits with ``exit_code``;
    it never shows a traceback for these.
    """

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ShardFailedError(JacpipeError):
    """A user's function raised inside a shard; not retried."""

    exit_code = 1


class SparsityError(JacpipeError, ValueError):
    """Sparsity detection refused: random ops, or control flow on x in global mode.

    Also a ``ValueError`` (what it was before it was a :class:`JacpipeError`).
    """


class SampleShapeError(JacpipeError, ValueError):
    """A per-sample output has another number of entries than the first sample's."""


class OutputTypeError(JacpipeError, TypeError):
    """``fn`` returned something that has no real Jacobian: not a floating, real tensor."""


def first_line(exc: BaseException | str, *, limit: int | None = None) -> str:
    """The first non-empty line of an exception's message (its type name if it has none).

    Used wherever a foreign error (Ray, torch, a user's job) is folded into
    one of our one-line messages.
    """
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    line = text.splitlines()[0]
    return line[:limit] if limit is not None else line
