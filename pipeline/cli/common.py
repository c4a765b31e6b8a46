"""What every ``jacpipe`` command shares: one-line errors and the console.

Errors a user can cause (:class:`~pipeline.core.errors.JacpipeError`) and Ctrl-C
print one line and exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from typer.core import TyperGroup

from pipeline.core.errors import JacpipeError

F = TypeVar("F", bound=Callable[..., Any])


def no_color() -> bool:
    """Whether ``NO_COLOR`` asks for output without colour (set and not empty: no-color.org)."""
    return bool(os.environ.get("NO_COLOR"))


def err(message: str) -> None:
    """Print ``error: message`` on stderr (red, unless ``NO_COLOR`` is set)."""
    typer.secho(f"error: {message}", fg=None if no_color() else typer.colors.RED, err=True)


def complete_job(incomplete: str) -> list[str]:
    """Shell completion of JOB: the built-in job names starting with ``incomplete``.

    (Module names only: no job is imported, so completing stays fast.)
    """
    from pipeline.problem.problem import builtin_jobs

    return [name for name in builtin_jobs() if name.startswith(incomplete)]


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


# ---------------------------------------------------------------------------
# Help conventions: readable types, visible choices and defaults
# ---------------------------------------------------------------------------

_TYPE_NAMES = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "bool": "BOOLEAN"}


def _type_label(param: Any, ctx: Any) -> str | None:
    """What the help's type column shows for ``param`` (None: nothing, for flags)."""
    if getattr(param, "is_flag", False):
        return None
    choices = choices_of(param)
    if choices:
        return "[" + "|".join(map(str, choices)) + "]"
    name = param.display_type(ctx).strip("<>")
    repeated = name.startswith("list[")
    name = name.removeprefix("list[").removesuffix("]")
    label = _TYPE_NAMES.get(name, name.upper())
    return label + ("..." if repeated else "")


def choices_of(param: Any) -> tuple[Any, ...] | None:
    """The values a Typer parameter accepts when its type is a choice (Literal or Enum).

    Args:
        param: a parameter of a Typer command.

    Returns:
        Its choices, or None.
    """
    return getattr(getattr(param, "type_descriptor", None), "choices", None)


def usage_name(param: Any) -> str:
    """An argument as the usage line shows it: ``JOB``, ``[FILE]``, ``ARGS...``.

    Its metavar, else its name in capitals; brackets only when it is optional
    (Typer's own usage line writes a required argument as ``{name}``).
    """
    name = param.metavar or param.name.upper()
    if param.nargs != 1:
        name += "..."
    return name if param.required else f"[{name}]"


def polish(command: Any, ctx: Any) -> Any:
    """Give ``command``'s help readable types, bracketed choices and literal brackets.

    Typer prints types as ``<str>``/``<bool>`` and Rich takes ``[default: x]``
    in help text for markup (it vanished): types become ``TEXT``/``INTEGER`` or
    ``[a|b]`` for a choice type, flags show none, and ``[`` in help text is
    escaped. Arguments show in the usage line as :func:`usage_name` writes
    them (``JOB``, not ``{JOB}``). Idempotent.

    Args:
        command: a Typer (click) command or group.
        ctx: the click context it is shown in (for its help option).

    Returns:
        ``command``.
    """
    if getattr(command, "_jacpipe_polished", False):
        return command
    params = list(command.params)
    help_option = command.get_help_option(ctx)
    if help_option is not None:
        params.append(help_option)
    for param in params:
        if getattr(param, "param_type_name", None) == "argument":
            param._usage_display_name = functools.partial(usage_name, param)  # instance override
        label = _type_label(param, ctx)
        param.display_type_rich = lambda ctx, label=label: label  # instance override
        text = getattr(param, "help", None)
        if text and "\\[" not in text:
            param.help = text.replace("[", "\\[")
    command._jacpipe_polished = True
    return command


def forwarded_options(run_command: Any) -> str:
    """One line naming every option of ``jacpipe run`` (``submit`` forwards them all).

    Args:
        run_command: the click command behind ``jacpipe run``.

    Returns:
        ``"-p/--param, -o/--out, --shards, ..."``.
    """
    names = []
    for param in run_command.params:
        opts = [*param.opts, *param.secondary_opts]
        if not opts or not opts[0].startswith("-"):
            continue  # the JOB argument
        names.append("/".join(sorted(opts, key=len)))
    return ", ".join(names)


class JacpipeGroup(TyperGroup):
    """The ``jacpipe`` group: applies :func:`polish` to every command it hands out."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """The command ``cmd_name``, polished; ``submit`` lists the run options it forwards."""
        command = super().get_command(ctx, cmd_name)
        if command is None or getattr(command, "_jacpipe_polished", False):
            return command
        if cmd_name == "submit":
            run = super().get_command(ctx, "run")
            if run is not None:
                command.epilog = (
                    (command.epilog or "") + "\n\nForwarded to `jacpipe run` (see "
                    "`jacpipe run --help`): " + forwarded_options(run)
                )
        return polish(command, ctx)

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a :class:`JacpipeError` while parsing its options is one line.

        (:class:`~pipeline.cli.options.RunCommand` refuses a bad choice that way.)
        With ``NO_COLOR`` set, nothing the command prints is coloured.
        """
        if no_color():
            ctx.color = False  # every command's echo and secho (Rich reads NO_COLOR itself)
        try:
            return super().invoke(ctx)
        except JacpipeError as exc:
            err(str(exc))
            raise typer.Exit(code=exc.exit_code) from None

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """The group's own help, polished too."""
        polish(self, ctx)
        super().format_help(ctx, formatter)
