"""What every ``jacpipe`` command shares: one-line errors and the console.

Errors a user can cause (:class:`~pipeline.errors.JacpipeError`) and Ctrl-C
print one line and exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from pipeline.errors import JacpipeError

F = TypeVar("F", bound=Callable[..., Any])


def err(message: str) -> None:
    """Print ``error: message`` on stderr."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def user_errors(fn: F) -> F:
    """Turn :class:`JacpipeError` and Ctrl-C into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except JacpipeError as exc:
            err(str(exc))
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def console() -> Any:
    """A rich console on stdout (imported lazily: ``jacpipe --help`` stays fast)."""
    from rich.console import Console

    return Console()
