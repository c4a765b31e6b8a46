"""``jacpipe run``'s parameters, derived from :class:`~pipeline.core.options.RunOptions`.

Each field's ``metadata["cli"]`` (flags, help, choices) becomes one ``Annotated``
Typer parameter; :func:`takes_run_options` gives a command those parameters
(through a generated ``__signature__``, which Typer reads) and
:func:`run_options` turns what the command received back into ``RunOptions``.
The flags, help and choices are therefore spelled once, in ``core.options``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import typer
from typer.core import TyperCommand

from pipeline.cli.common import complete_job
from pipeline.core.errors import JacpipeError
from pipeline.core.options import CLI, RunOptions, choice_error

F = TypeVar("F", bound=Callable[..., Any])


def cli_fields() -> list[dataclasses.Field[Any]]:
    """The fields of :class:`RunOptions` that ``jacpipe run`` offers, in their order."""
    return [f for f in dataclasses.fields(RunOptions) if CLI in f.metadata]


def _required(f: dataclasses.Field[Any]) -> bool:
    """Whether ``f`` has no default at all (the JOB argument)."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def cli_default(f: dataclasses.Field[Any]) -> Any:
    """What the command line holds for ``f`` when it is not given.

    A field with a default factory (``params``, ``executor``) gets None there:
    :func:`run_options` then leaves it out and ``RunOptions`` computes its own.
    """
    return None if f.default is dataclasses.MISSING else f.default


def _value_type(f: dataclasses.Field[Any], hint: Any) -> Any:
    """The type of ``f``'s value on the command line (no ``None``; choices as a Literal)."""
    facts = f.metadata[CLI]
    if facts["choices"]:
        return Literal[facts["choices"]]
    if facts["type"] is not None:
        return facts["type"]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def _annotation(f: dataclasses.Field[Any], hint: Any) -> Any:
    """``Annotated[type, typer.Option(...)]`` (or ``typer.Argument``) for field ``f``."""
    facts = f.metadata[CLI]
    value_type = _value_type(f, hint)
    if not _required(f) and cli_default(f) is None:
        value_type = value_type | None
    common = {"help": facts["help"], "metavar": facts["metavar"],
              "show_default": facts["show_default"]}
    if not facts["flags"]:
        return Annotated[value_type, typer.Argument(**common, autocompletion=complete_job)]
    return Annotated[value_type, typer.Option(*facts["flags"], **common)]


def run_parameters() -> list[inspect.Parameter]:
    """One keyword-only parameter per CLI field of :class:`RunOptions`."""
    hints = typing.get_type_hints(RunOptions)
    params = []
    for f in cli_fields():
        default = inspect.Parameter.empty if _required(f) else cli_default(f)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=_annotation(f, hints[f.name])))
    return params


def takes_run_options(fn: F) -> F:
    """Give ``fn`` (with ``**options``) the run options as parameters Typer sees.

    Args:
        fn: a command whose own parameters are the CLI-only ones, plus ``**options``
            receiving the run options.

    Returns:
        ``fn``, with a ``__signature__`` of the run options then its own parameters.
    """
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    run = run_parameters()
    clash = {p.name for p in run} & {p.name for p in own}
    if clash:
        raise TypeError(f"{fn.__name__}: {sorted(clash)} are run options already")
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    fn.__signature__ = inspect.Signature([*run, *own])  # type: ignore[attr-defined]
    return fn


def run_options(received: dict[str, Any]) -> RunOptions:
    """The :class:`RunOptions` behind what a command received for the run options.

    Args:
        received: the command's keyword arguments (others than run options are ignored);
            None means "not given": the dataclass default applies.

    Returns:
        The options (not yet checked).
    """
    names = {f.name for f in cli_fields()}
    given = {k: list(v) if isinstance(v, tuple) else v
             for k, v in received.items() if k in names and v is not None}
    return RunOptions(**given)


class RunCommand(TyperCommand):
    """``jacpipe run``: a value outside a field's choices is the library's one-line error.

    Typer checks the choices (shown in help, completed by shells); the refusal
    is :func:`~pipeline.core.options.choice_error`'s line, the same as the
    Python API's, not a usage panel.
    """

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        """Parse ``args``; a bad choice raises :class:`JacpipeError` (exit 2)."""
        given = list(args)
        try:
            return super().parse_args(ctx, args)
        except typer.BadParameter as exc:
            name = getattr(exc.param, "name", None)
            field = next((f for f in cli_fields() if f.name == name), None)
            if field is None or not field.metadata[CLI]["choices"]:
                raise
            opts, _, _ = self.make_parser(ctx).parse_args(args=given)
            raise JacpipeError(choice_error(field.name, opts.get(field.name))) from None
