"""The job as the driver checks it: built once, validated, fingerprinted, its pattern chosen.

Everything here runs in the driver before any Ray start-up, so a typo, a
wrong shape or a job that cannot be differentiated costs one second.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import kind_of
from pipeline.core.options import RunOptions
from pipeline.core.shapes import Shapes
from pipeline.core.smoothing import Smoothing
from pipeline.problem.problem import (
    Problem,
    build_problem,
    fingerprint,
    job_parameters,
    parse_params,
    probe_failed,
    resolve_builder,
    validate,
    with_kind,
)

if TYPE_CHECKING:
    from pipeline.maths.adjoint import AdjointCheck, SpotCheck
    from pipeline.problem.problem import Problem


@dataclass(frozen=True)
class CheckedJob:
    """A job checked and built in the driver: what the plan and the workers need of it."""

    spec: str
    params: dict[str, Any]
    shapes: Shapes
    fingerprint: dict[str, Any]
    device_param: bool
    pattern: PatternChoice  # the sparsity pattern and where it came from
    adjoint: AdjointCheck | None  # when forward mode was on the table
    spot: SpotCheck | None = None  # vectorised rows against plain autograd (vmap spot check)
    pass_seconds: float = 0.0  # one forward + backward, timed by the fingerprint
    problem: Problem | None = None  # handed in memory (shipped to workers), else None
    smoothing: Smoothing | None = None
    #: the problem built in the driver, kept only when asked (``check_job(keep_built=True)``)
    built: Problem | None = field(default=None, repr=False, compare=False)


def check_job(opts: RunOptions, given: Any = None, *, in_process: bool = False,
              keep_built: bool = False) -> CheckedJob:
    """Build the job once in the driver (or take the one given): shapes, fingerprint, pattern.

    Args:
        in_process: for a result computed in this process and never written
            (``pipeline.jacobian``): no fingerprint (no worker to check it;
            :func:`with_fingerprint` adds it when the run needs one), and no
            sparsity detection under ``--method auto`` for a few milliseconds
            of dense work (NOTE: [Small jobs in process]), nor the run-level
            vmap spot check there: its two reference rows cost as much as such
            a result, whose one engine call checks a random row of its own
            against an unbatched pullback (NOTE: [Checks on every engine call]).
        keep_built: keep the problem built here in ``CheckedJob.built`` (the
            ``--verify`` reference computed while the run goes on).

    Raises:
        JacpipeError: unknown job, bad parameter, a build jacpipe cannot use.
    """
    if given is not None:
        problem, params, device_param = given, {}, False
    else:
        builder = resolve_builder(opts.job)
        params = parse_params(builder, opts.params)
        device_param = "device" in job_parameters(builder)
        if opts.dtype is not None:
            if "dtype" not in job_parameters(builder):
                raise JacpipeError(f"--dtype: job {opts.job!r} has no dtype parameter")
            params["dtype"] = opts.dtype
        problem = build_problem(opts.job, params)
    problem = with_kind(problem, opts.kind)
    given = given if given is None else problem
    shapes = validate(problem, opts.job)
    refuse_random(problem, opts.job)
    smoothing = opts.smoothing()
    if smoothing is not None:
        from pipeline.maths.smoothing import check_problem

        check_problem(smoothing, problem, opts.job)
    passes = _pass_seconds(problem) if in_process else 0.0
    detect = not in_process or passes * shapes.total_rows / 16 > DETECT_MIN_SECONDS
    pattern = PatternChoice() if smoothing else run_pattern(opts, problem, shapes, detect=detect)
    fp = {} if in_process else _fingerprint(problem, shapes, opts.job, given)
    return CheckedJob(
        spec=opts.job,
        params=json.loads(json.dumps(params, default=str)),
        shapes=shapes,
        fingerprint=fp,
        pass_seconds=passes or _pass_seconds(problem),
        problem=given,
        device_param=device_param,
        # the driver holds metadata only (and a sparsity pattern if any)
        pattern=pattern,
        adjoint=_adjoint_if_forward_possible(opts, problem, shapes, pattern.pattern),
        spot=None if smoothing or not detect else _vmap_spot_check(problem, shapes),
        smoothing=smoothing,
        built=problem if keep_built else None,
    )


def _vmap_spot_check(problem: Problem, shapes: Shapes) -> SpotCheck | None:
    """Two random vectorised rows against plain autograd (NOTE: [The vmap spot check])."""
    from pipeline.maths.adjoint import vmap_spot_check

    return vmap_spot_check(problem, m=shapes.m if kind_of(shapes.kind).jacobian_rows else None)


def refuse_random(problem: Problem, spec: str) -> None:
    """A random op in fn: refused before a shard (NOTE: [Random ops refused deterministically]).

    Raises:
        JacpipeError: ``fn`` draws random numbers that change from call to call.
    """
    from pipeline.sparse.randomness import refuse_random_ops

    x = problem.x[0] if kind_of(problem.kind).per_sample else problem.x
    refuse_random_ops(problem.fn, x, spec)


#: Dense work (seconds, estimated) below which an in-process call skips sparsity detection.
DETECT_MIN_SECONDS = 0.05


def _fingerprint(problem: Problem, shapes: Shapes, spec: str, given: Any) -> dict[str, Any]:
    try:
        return fingerprint(problem, shapes, spec=None if given is not None else spec)
    except JacpipeError:
        raise
    except Exception as exc:  # the user's fn or backward, met first by the derivative probe
        raise probe_failed(exc, spec) from None


def with_fingerprint(job: CheckedJob) -> CheckedJob:
    """``job`` (checked ``in_process``) with its fingerprint, for a run that writes shards.

    Raises:
        JacpipeError: the derivative probe failed (the user's fn or backward).
    """
    if job.fingerprint or job.problem is None:
        return job
    import dataclasses

    fp = _fingerprint(job.problem, job.shapes, job.spec, job.problem)
    return dataclasses.replace(job, fingerprint=fp)


def _pass_seconds(problem: Problem) -> float:
    """One forward + backward pass, estimated as 3 warm forward passes (for the executor choice).

    Timed after the fingerprint has run ``fn``: the first call of a process pays
    torch's one-time set-up (0.5 s measured for a 100 x 100 MLP), which would
    make every small job look like seconds of work.
    """
    import torch

    x = problem.x[0] if kind_of(problem.kind).per_sample else problem.x
    t0 = time.perf_counter()
    with torch.no_grad():
        problem.fn(x.detach().clone())
    return 3 * (time.perf_counter() - t0)


def _adjoint_if_forward_possible(opts: RunOptions, problem: Problem, shapes: Shapes, pattern: Any
                                 ) -> AdjointCheck | None:
    """Check forward against reverse mode at ``x`` where forward mode may be used.

    NOTE: [Adjoint check before forward mode]
        Forward mode (``torch.func.jvp``) ignores what reverse mode honours
        (``no_grad`` blocks, gradient hooks, ``padding_idx``, custom Functions
        whose ``jvp`` and ``backward`` disagree): ``u . (J v)`` by one JVP
        and ``(Jᵀ u) . v`` by one VJP agree to rounding exactly when both
        modes compute the same derivative (:func:`pipeline.maths.adjoint.adjoint_check`,
        2.9-5.0x one forward + backward, measured). It runs wherever
        forward mode is on the table: ``--method fwd``; ``auto`` on a tall
        problem (``2 n < m``, the cost model's precondition); and every
        sparse run (``auto`` or ``sparse`` with a pattern): a column
        colouring is one JVP per colour, a Hessian's colours one
        forward-over-reverse product each. Dense Hessian rows use
        reverse-over-reverse under ``auto``. Each engine call checks its
        own rows as well (NOTE: [Checks on every engine call]).
    """
    from pipeline.runner.plan import FWD_MARGIN

    if not kind_of(shapes.kind).jacobian_rows:
        return None  # Taylor mode: no forward-mode Jacobian to check
    tall = (shapes.n * FWD_MARGIN < shapes.m and not kind_of(shapes.kind).symmetric
            and pattern is None)
    coloured = pattern is not None and opts.method in ("auto", "sparse")
    if not (opts.method == "fwd" or (opts.method == "auto" and tall) or coloured):
        return None
    from pipeline.maths.adjoint import adjoint_check

    return adjoint_check(problem.fn, problem.x, kind=problem.kind)


@dataclass(frozen=True)
class PatternChoice:
    """The sparsity pattern of a run and where it came from.

    Args:
        pattern: boolean CSR, or None (dense path).
        source: ``"job"``, ``"file"``, ``"detected"`` (global: holds at any
            x), ``"detected-local"`` (holds at this x only), or None.
        seconds: time spent detecting it (0 when given).
        note: one line for the user (what detection found or why it was not used).
    """

    pattern: Any = None
    source: str | None = None
    seconds: float = 0.0
    note: str | None = None
    quiet: bool = False  # the note is for the manifest only (--method auto found nothing)

    def facts(self) -> dict[str, Any] | None:
        """What the manifest records of a detection (None when the pattern was given)."""
        if self.source is None or not self.source.startswith("detected") and not self.note:
            return None
        return {"source": self.source, "seconds": round(self.seconds, 4), "note": self.note}


#: ``--sparsity`` values that detect the pattern instead of reading a file.
DETECT = {"auto": "global", "auto-local": "local"}


def run_pattern(options: RunOptions, problem: Problem, shapes: Shapes, *, detect: bool = True
                ) -> PatternChoice:
    """The sparsity pattern a run uses: ``--sparsity FILE|auto``, the job's, or detected.

    ``--sparsity auto`` (or ``Problem(sparsity="auto")``) detects the pattern
    by tracing ``fn`` (:mod:`pipeline.sparse.detect`, global mode: valid at any
    x; ``auto-local``: at this x only). ``--method auto`` without any pattern
    tries the same detection with its density cap (a dense problem gives up
    within about three forward passes) and keeps the dense path when it
    gives up (``detect`` False skips that try). Dense methods (``rev``, ``fwd``) use none.

    Raises:
        JacpipeError: ``--method sparse`` without a pattern, a pattern of the
            wrong shape, a pattern for per-sample Jacobians, or an explicit
            detection that cannot be done (random ops, control flow on x).
    """
    if options.method not in ("auto", "sparse"):
        return PatternChoice()
    if not kind_of(shapes.kind).sparse_ok:
        if options.sparsity or options.method == "sparse":
            raise JacpipeError(
                f"--sparsity / --method sparse: sparsity patterns apply to the jacobian and "
                f"hessian kinds, not {shapes.kind}; leave them out")
        return PatternChoice()
    asked = options.sparsity or (problem.sparsity if isinstance(problem.sparsity, str) else None)
    if asked in DETECT:
        choice = _detected(problem, shapes, DETECT[asked], explicit=True,
                           needed=options.method == "sparse")
    elif options.sparsity:
        from pipeline.sparse.compressed import load_pattern

        choice = PatternChoice(load_pattern(options.sparsity), "file")
    elif problem.sparsity is not None:
        from pipeline.sparse.coloring import as_pattern

        choice = PatternChoice(as_pattern(problem.sparsity), "job")
    elif options.method == "sparse":
        raise JacpipeError(
            f"--method sparse: job {options.job!r} has no sparsity pattern; give one with "
            "--sparsity FILE (.npz scipy matrix or Parquet with row/col columns) or "
            "--sparsity auto (detected)"
        )
    elif kind_of(shapes.kind).per_sample or not detect:
        return PatternChoice()
    else:
        choice = _detected(problem, shapes, "global", explicit=False, needed=False)
    if choice.pattern is not None:
        _check_pattern_shape(choice.pattern, shapes)
    return choice


def _check_pattern_shape(pattern: Any, shapes: Shapes) -> None:
    if kind_of(shapes.kind).per_sample:
        raise JacpipeError("sparsity patterns are supported for jacobian and hessian kinds")
    if pattern.shape != (shapes.m, shapes.n):
        raise JacpipeError(
            f"sparsity pattern has shape {pattern.shape}, expected {(shapes.m, shapes.n)} "
            f"(rows x columns of the {shapes.kind})"
        )


def _detected(problem: Problem, shapes: Shapes, mode: str, *, explicit: bool, needed: bool
              ) -> PatternChoice:
    """Detect the pattern; an explicit request fails loudly, ``--method auto`` quietly."""
    from pipeline.sparse.detect import SparsityError, trace_sparsity

    if kind_of(shapes.kind).per_sample:
        raise JacpipeError("--sparsity auto: sparsity patterns are supported for jacobian and "
                           "hessian kinds, not per-sample Jacobians")
    try:
        report = trace_sparsity(problem.fn, problem.x, kind=shapes.kind, mode=mode)
    except SparsityError as exc:
        if explicit:
            raise JacpipeError(f"--sparsity auto: {exc}") from None
        return PatternChoice(note=f"no sparsity detected ({exc}); dense path", quiet=True)
    source = "detected" if mode == "global" else "detected-local"
    if report.dense:
        if needed:
            raise JacpipeError(
                f"--method sparse with --sparsity auto: the Jacobian is dense ({report.reason}); "
                "use --method auto, rev or fwd")
        return PatternChoice(None, source, report.seconds,
                             f"sparsity detection gave up in {report.seconds:.2f}s "
                             f"({report.reason}); dense path", quiet=not explicit)
    held = " (holds at this x only)" if mode == "local" else ""
    return PatternChoice(report.pattern, source, report.seconds,
                         f"sparsity detected in {report.seconds:.2f}s: {report.reason}{held}")
