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


class MismatchError(JacpipeError):
    """The pipeline's result disagrees with the reference (``compare``)."""

    exit_code = 1


class ShardFailedError(JacpipeError):
    """A user's function raised inside a shard; not retried."""

    exit_code = 1
