"""What a user asks of a run: :class:`RunOptions`, the options of ``jacpipe run`` and ``run``.

Pure values and their checks: no torch, no Ray. The planner
(:mod:`pipeline.runner.plan`) turns them into a plan.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.core.codec import DEFAULT_COMPRESSION, parse_compression
from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import KIND_NAMES
from pipeline.core.smoothing import ESTIMATORS

DEVICES = ("auto", "cpu", "cuda")


EXECUTORS = ("auto", "ray", "local")


METHODS = ("auto", "rev", "fwd", "sparse")


DTYPES = ("float32", "float64")


#: ``--compile``: torch.compile the AD passes (compressed sparse, dense row chunks,
#: per-sample blocks, Taylor operators) always (on), never
#: (off), or once the eager time spent on a pass reaches the price of compiling
#: (auto; pipeline/maths/compiled.py).
COMPILE_MODES = ("auto", "on", "off")


#: The key of a field's command-line facts in its ``dataclasses.field(metadata=...)``
#: (see :func:`cli`); fields without it are Python-only.
CLI = "cli"


def cli(
    *flags: str,
    help: str,
    choices: tuple[str, ...] | None = None,
    choices_text: str | None = None,
    type: type | None = None,
    metavar: str | None = None,
    show_default: bool = True,
) -> dict[str, dict[str, Any]]:
    """The metadata of a :class:`RunOptions` field that ``jacpipe run`` offers.

    Plain data: :mod:`pipeline.cli.options` turns it into the command's parameter.

    Args:
        *flags: the option's names, e.g. ``"--param", "-p"`` or ``"--resume/--no-resume"``;
            none for the positional argument.
        help: the help text (``jacpipe run --help``).
        choices: the values allowed, when the set is fixed (shown, completed, checked).
        choices_text: how a refusal names them, when not ``a, b or c``.
        type: the value's type on the command line, when not the field's own.
        metavar: the name the argument is shown as.
        show_default: whether help shows the default.

    Returns:
        ``{"cli": {...}}``, for ``field(metadata=...)``.
    """
    facts = {"flags": flags, "help": help, "choices": choices, "choices_text": choices_text,
             "type": type, "metavar": metavar, "show_default": show_default}
    return {CLI: facts}


def _opt(default: Any, *flags: str, **facts: Any) -> Any:
    """A field defaulting to ``default``, offered as ``flags`` (the rest: :func:`cli`'s)."""
    return field(default=default, metadata=cli(*flags, **facts))


@dataclass
class RunOptions:
    """Everything ``jacpipe run`` accepts (see ``jacpipe run --help``).

    Each field's ``metadata["cli"]`` (:func:`cli`) holds its flags, help and
    choices: the command line is derived from these fields, never spelled again.
    """

    job: str = field(metadata=cli(
        help="Built-in job name (see `jacpipe jobs`) or 'module:function'.", metavar="JOB"))
    params: list[str] = field(default_factory=list, metadata=cli(
        "--param", "-p", help="Job parameter NAME=VALUE (repeatable), e.g. -p n=4000 -p m=3000."))
    out: str | None = _opt(None, "--out", "-o",
                           help="Result folder or s3:// URI [default: out/JOB].")
    shards: int | None = _opt(None, "--shards", help=(
        "Number of shards of output rows [default: 2 per task slot, more to keep part files "
        "under 256 MiB, in whole rounds of the slots]."))
    rows_per_shard: int | None = _opt(None, "--rows-per-shard",
                                      help="Rows per shard (instead of --shards).")
    address: str | None = _opt(None, "--address", help=(
        "Ray cluster address (HOST:PORT or auto); default: an embedded local Ray."))
    num_cpus: int | None = _opt(None, "--num-cpus",
                                help="CPUs of the embedded local Ray [default: all].")
    cpus_per_shard: float = _opt(1.0, "--cpus-per-shard",
                                 help="CPUs (and torch threads) per shard task.")
    gpus_per_shard: float | None = _opt(None, "--gpus-per-shard", help=(
        "GPUs per shard task, fractions allowed [default: 1 if the cluster has GPUs, else 0]."))
    device: str = _opt("auto", "--device", help="auto, cpu or cuda.", choices=DEVICES)
    dtype: str | None = _opt(None, "--dtype", choices=DTYPES, help=(
        "float32 or float64 (passed to the job's dtype parameter)."))
    method: str = _opt(
        "auto", "--method", choices=METHODS,
        choices_text="auto, rev or fwd (or sparse, given a pattern)",
        help="auto (sparse when a pattern is known, else the fwd/rev cost model), rev (VJP "
        "per row), fwd (JVP per column) or sparse (graph colouring: one compressed pass per "
        "colour).")
    memory_budget: str | None = _opt(None, "--memory-budget", help=(
        "Peak memory per task, e.g. 2GiB [default: half the node's memory over its task "
        "slots]."))
    chunk_size: int | None = _opt(None, "--chunk-size", help=(
        "Override the rows per vectorised pass (normally from --memory-budget)."))
    kind: str | None = _opt(None, "--kind", choices=KIND_NAMES, help=(
        "What to compute, instead of the job's own kind: jacobian, hessian, batched, laplacian, "
        "biharmonic, taylor (per-point operators over points (P, D)) or third (third "
        "derivatives of a scalar fn) [default: the job's]."), show_default=False)
    sparsity: str | None = _opt(None, "--sparsity", help=(
        "Sparsity pattern: FILE (.npz scipy matrix, or Parquet with row/col columns), 'auto' "
        "(detected by tracing fn: holds at any x) or 'auto-local' (at this x only); overrides "
        "the job's. Without it, --method auto detects a pattern when that is cheap."))
    resume: bool = _opt(True, "--resume/--no-resume",
                        help="Keep committed shards of the same job in --out.")
    overwrite: bool = _opt(False, "--overwrite",
                           help="Replace a result of another job in --out.")
    #: Python only: at most this many shard tasks queued at once.
    max_in_flight: int | None = None
    progress: bool = _opt(True, "--progress/--no-progress", help="Show progress.")
    shard_timeout: float | None = _opt(None, "--shard-timeout", help=(
        "Fail the run (resumably) when one shard runs longer than this many seconds; without "
        "it a shard running 10x the median (and over a minute) is only reported."))
    #: ``local`` runs the shards in this process, ``ray`` as Ray tasks, ``auto``
    #: picks ``local`` for a few seconds of work without ``--address``
    #: (default: ``$JACPIPE_EXECUTOR`` or ``auto``).
    executor: str = field(default_factory=lambda: _default_executor(), metadata=cli(
        "--executor", choices=EXECUTORS,
        help="Where shards compute: ray (Ray tasks), local (this process: the same shard code, "
        "parts and manifest, no Ray start-up) or auto (local for a few seconds of work "
        "without --address, else ray) [default: $JACPIPE_EXECUTOR or auto]."))
    compression: str = _opt(DEFAULT_COMPRESSION, "--compression", help=(
        "Parquet codec of the part files: zstd, zstd:LEVEL, lz4, snappy, none, or auto (the "
        "codec that commits fastest by the encode and disk write rates measured in the run; "
        "a resume keeps the manifest's codec)."))
    compile: str = _opt("auto", "--compile", choices=COMPILE_MODES, help=(
        "torch.compile the AD passes (sparse compressed, dense row chunks, per-sample "
        "blocks, Taylor operators): on, off, or auto (compile once the "
        "eager passes of a worker have cost about what compiling does). Compiled code is "
        "cached on disk ($TORCHINDUCTOR_CACHE_DIR, default ~/.cache/jacpipe/inductor)."))
    #: Randomized smoothing (pipeline.maths.smoothing): sigma (a number, "auto" or a
    #: .npy file of per-input sigmas), samples K, estimator, seed of the draws.
    smooth: float | str | None = _opt(None, "--smooth", type=str, help=(
        "Randomized smoothing: the Jacobian of E[f(x + sigma w)], w ~ N(0, I), with a stderr "
        "column. SIGMA, auto (0.01 * max(1, |x_j|) per input) or FILE.npy (one sigma per "
        "flat input)."))
    samples: int = _opt(64, "--samples", help=(
        "With --smooth: K perturbations, even (K/2 antithetic pairs +w, -w)."))
    estimator: str = _opt("first", "--estimator", choices=ESTIMATORS, help=(
        "With --smooth: first (mean of J(x + sigma w)), zeroth (mean of f(x + sigma w) w^T / "
        "sigma) or both (first-order values, zeroth-order in extra columns)."))
    smooth_seed: int = _opt(0, "--smooth-seed", help=(
        "With --smooth: seed of the perturbations (the same for any number of shards)."))

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
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise JacpipeError(choice_error(name, value))
        if self.num_cpus is not None and self.num_cpus < 1:
            raise JacpipeError(f"--num-cpus must be at least 1, got {self.num_cpus}")
        self._check_shares()
        if self.memory_budget is not None:
            parse_size(self.memory_budget)
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

    def _check_shares(self) -> None:
        """Refuse a --cpus-per-shard or --gpus-per-shard that no cluster could grant.

        Checked here, not against the cluster, so that 0, a negative value or NaN
        is named for what it is rather than compared with the cluster's CPUs.
        """
        cpus = self.cpus_per_shard
        if not (math.isfinite(cpus) and cpus > 0):
            raise JacpipeError(
                f"--cpus-per-shard must be a positive number of CPUs (e.g. 1 or 0.5), "
                f"got {cpus:g}"
            )
        gpus = self.gpus_per_shard
        if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
            raise JacpipeError(
                f"--gpus-per-shard must be 0 or a positive number of GPUs (e.g. 1 or 0.25), "
                f"got {gpus:g}"
            )

    def smoothing(self) -> Any:
        """The :class:`~pipeline.core.smoothing.Smoothing` asked for, or None.

        Raises:
            JacpipeError: a bad --smooth, --samples or --estimator.
        """
        from pipeline.core.smoothing import parse_smooth

        return parse_smooth(self.smooth, samples=self.samples, seed=self.smooth_seed,
                            estimator=self.estimator)


#: The fields with a fixed set of values, and those values (from their metadata).
CHOICES: dict[str, tuple[str, ...]] = {
    f.name: f.metadata[CLI]["choices"] for f in fields(RunOptions)
    if f.metadata.get(CLI, {}).get("choices")
}


def choice_error(name: str, value: object) -> str:
    """The one line refusing ``value`` for the choice field ``name``.

    Args:
        name: a field of :data:`CHOICES`, e.g. ``"device"``.
        value: what arrived.

    Returns:
        e.g. ``"--device must be auto, cpu or cuda, got 'tpu'"``.
    """
    facts = next(f for f in fields(RunOptions) if f.name == name).metadata[CLI]
    choices = facts["choices"]
    allowed = facts["choices_text"] or f"{', '.join(choices[:-1])} or {choices[-1]}"
    return f"{facts['flags'][0].split('/')[0]} must be {allowed}, got {value!r}"


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


#: Words that follow a flag in our messages without being its value.
_NOT_VALUES = frozenset({"must", "is", "was", "to", "and", "or", "with", "without", "takes",
                         "only", "applies", "expects", "of", "for", "in", "computes", "cannot",
                         "ran", "the", "a", "an", "holds", "gives", "needs", "as", "at"})


def python_spelling(message: str) -> str:
    """``message`` with ``jacpipe run``'s flags spelled as the Python API's arguments.

    ``--overwrite`` becomes ``overwrite=True``, ``--no-resume`` ``resume=False``,
    ``--out DIR`` ``out=DIR``, "rerun the same command" "call again with the
    same arguments": what a caller of ``pipeline.run`` / ``pipeline.jacobian``
    does to act on the message.

    Args:
        message: a :class:`~pipeline.core.errors.JacpipeError` line written for the CLI.

    Returns:
        The same line naming Python arguments.
    """
    spelled: dict[str, str] = {}
    for f in fields(RunOptions):
        flags = f.metadata.get(CLI, {}).get("flags", ())
        for flag in flags:
            for i, part in enumerate(flag.split("/")):
                if not part.startswith("--"):
                    continue
                if f.type in ("bool", bool):
                    spelled[part] = f"{f.name}={i == 0}"
                else:
                    spelled[part] = f"{f.name}="
    pattern = re.compile(r"(?<![\w-])(" + "|".join(
        re.escape(k) for k in sorted(spelled, key=len, reverse=True)) + r")(?![\w-])( \S+)?")

    def swap(match: re.Match[str]) -> str:
        name, rest = spelled[match.group(1)], match.group(2) or ""
        if not name.endswith("="):
            return name + rest
        value = rest.strip()
        if not value or value.lower().strip(":;,.()") in _NOT_VALUES or value[0] in "([{'\"":
            return name[:-1] + rest
        return f"{name}{value}"

    return pattern.sub(swap, message).replace("rerun the same command",
                                              "call again with the same arguments")
