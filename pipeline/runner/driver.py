"""The driver: check the job, connect Ray, plan, run shards in a bounded window, commit.

The driver holds metadata only: each Ray task computes and writes its own
shard (:func:`pipeline.runner.worker.compute_shard`) and returns a small
:class:`~pipeline.core.shard.ShardResult`; the driver commits it through the
result folder's owner (:class:`~pipeline.store.folder.ResultFolder`), so a killed
driver loses nothing that was committed, and a rerun resumes. Every planning
decision is :func:`pipeline.runner.plan.make_plan`'s; this module only connects,
schedules, shows progress and reports failures.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import JacpipeError, ShardFailedError, first_line
from pipeline.core.kinds import kind_of
from pipeline.core.options import RunOptions
from pipeline.core.shapes import Shapes
from pipeline.core.shard import ShardInputs, ShardResult, ShardSpec
from pipeline.core.smoothing import Smoothing
from pipeline.problem.problem import (
    Problem,
    build_problem,
    fingerprint,
    job_parameters,
    parse_params,
    resolve_builder,
    validate,
)
from pipeline.runner.plan import (
    LOCAL_MAX_SECONDS,
    PatternChoice,
    Resources,
    RunPlan,
    Shard,
    estimate_seconds,
    local_resources,
    make_plan,
    run_pattern,
)
from pipeline.store.folder import ResultFolder, default_out
from pipeline.store.manifest import Manifest, utcnow, versions
from pipeline.store.storage import Storage

if TYPE_CHECKING:
    from pipeline.maths.adjoint import AdjointCheck

__all__ = ["Interrupted", "RunOptions", "RunSummary", "connect", "run"]

#: How often Ray retries a shard whose worker process died (SIGKILL, OOM).
MAX_RETRIES = 3


class Interrupted(JacpipeError):
    """Ctrl-C: tasks stopped (NOTE: [Stopping tasks without ray.cancel]), folder resumable."""

    exit_code = 130


@dataclass
class RunSummary:
    """What a finished run reports.

    Args:
        out: the result folder (URI; may hold credentials: print it through
            ``Storage.redact``).
        manifest: the :class:`~pipeline.store.manifest.Manifest` written.
        computed, skipped: shards computed now, and resumed from earlier runs.
        notes: what the run said along the way (also echoed).
    """

    out: str
    manifest: Manifest
    computed: int
    skipped: int
    notes: list[str]

    def __repr__(self) -> str:
        from pipeline.store.storage import Storage

        s = self.manifest.shapes
        return (f"RunSummary(out={Storage.redact(self.out)!r}, kind={s.kind!r}, "
                f"shape=({s.total_rows}, {s.n}), dtype={s.dtype!r}, "
                f"status={self.manifest.status!r}, computed={self.computed}, "
                f"skipped={self.skipped})")


@dataclass(frozen=True)
class _Job:
    """A job checked and built in the driver: what the plan and the workers need of it."""

    spec: str
    params: dict[str, Any]
    shapes: Shapes
    fingerprint: dict[str, Any]
    device_param: bool
    pattern: PatternChoice  # the sparsity pattern and where it came from
    adjoint: AdjointCheck | None  # when forward mode was on the table
    pass_seconds: float = 0.0  # one forward + backward, timed by the fingerprint
    problem: Problem | None = None  # handed in memory (shipped to workers), else None
    smoothing: Smoothing | None = None


def _uri_or_abspath(out: str) -> str:
    return out if "://" in out else os.path.abspath(out)


def _check_job(opts: RunOptions, given: Any = None) -> _Job:
    """Build the job once in the driver (or take the one given): shapes, fingerprint, pattern.

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
    shapes = validate(problem, opts.job)
    smoothing = opts.smoothing()
    if smoothing is not None:
        from pipeline.maths.smoothing import check_problem

        check_problem(smoothing, problem, opts.job)
    pattern = PatternChoice() if smoothing else run_pattern(opts, problem, shapes)
    fp = fingerprint(problem, shapes, spec=None if given is not None else opts.job)
    return _Job(
        spec=opts.job,
        params=json.loads(json.dumps(params, default=str)),
        shapes=shapes,
        fingerprint=fp,
        pass_seconds=_pass_seconds(problem),
        problem=given,
        device_param=device_param,
        # the driver holds metadata only (and a sparsity pattern if any)
        pattern=pattern,
        adjoint=_adjoint_if_forward_possible(opts, problem, shapes, pattern.pattern),
        smoothing=smoothing,
    )


def _pass_seconds(problem: Any) -> float:
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
        2.9-5.0x one forward + backward, measured). It runs only where
        forward mode is on the table: ``--method fwd``, or ``auto`` on a
        tall problem (``2 n < m``, the cost model's precondition) without a
        pattern. Hessian rows use reverse-over-reverse under ``auto``.
    """
    from pipeline.runner.plan import FWD_MARGIN

    tall = (shapes.n * FWD_MARGIN < shapes.m and not kind_of(shapes.kind).symmetric
            and pattern is None)
    if not (opts.method == "fwd" or (opts.method == "auto" and tall)):
        return None
    from pipeline.maths.adjoint import adjoint_check

    return adjoint_check(problem.fn, problem.x, kind=problem.kind)


# ---------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------


def _probe_address(address: str) -> None:
    """Fail fast (instead of Ray's long retries) when nothing listens at ``address``."""
    if address.startswith(("http://", "https://")):
        raise JacpipeError(
            f"--address {address}: that is a dashboard (Jobs API) address; `jacpipe run "
            "--address` expects the cluster's GCS address HOST:PORT (usually port 6379) or "
            f"auto on a cluster node; to run through the dashboard use `jacpipe submit JOB "
            f"... --address {address}`"
        )
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return
    except ValueError:
        raise JacpipeError(f"--address {address!r}: expected HOST:PORT or auto") from None
    except OSError as exc:
        raise JacpipeError(
            f"--address {address}: no Ray cluster reachable ({exc.strerror or exc}); "
            "start one with `ray start --head` or `make cluster-up`, or omit --address "
            "to use an embedded local Ray"
        ) from None


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Connect to Ray; returns True if this call started it (and should stop it).

    Args:
        address: ``HOST:PORT`` of a cluster's GCS, ``auto`` (on a cluster node,
            e.g. inside a submitted job) or ``ray://``; None starts an embedded Ray.
        num_cpus: CPUs of the embedded Ray (ignored with ``address``).

    Raises:
        JacpipeError: the cluster cannot be reached, refuses us (auth), or the
            address is a dashboard URL.
    """
    import ray

    if address:
        _probe_address(address)
    if num_cpus is not None and num_cpus < 1:
        raise JacpipeError(f"--num-cpus must be at least 1, got {num_cpus}")  # API callers
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = first_line(exc)
            hint = ""
            if isinstance(exc, ConnectionError):
                # A token-auth cluster answers a client without a token like a dead one.
                hint = (
                    "; if the cluster uses token authentication, set RAY_AUTH_MODE=token "
                    "and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN)"
                )
            raise JacpipeError(
                f"--address {address}: cannot connect to Ray ({first}){hint}"
            ) from None
        return True
    refuse_stale_cluster_env()
    ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return True


#: What `make cluster-up` exports; dropping them all makes `jacpipe run` local again.
CLUSTER_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")


def refuse_stale_cluster_env(environ: Any = None) -> None:
    """Refuse, in one line, cluster variables that would break an embedded local Ray.

    ``ray.init()`` joins ``RAY_ADDRESS`` when it is set, and demands a token
    when ``RAY_AUTH_MODE=token``: left over from a cluster that is gone (after
    ``make cluster-down``), they give Ray's raw retries or a 600-character
    auth error instead of a local run.

    Args:
        environ: the environment to look at (default ``os.environ``).

    Raises:
        JacpipeError: ``RAY_ADDRESS`` names a cluster nobody answers at, or
            token auth is on and no token can be read.
    """
    env = os.environ if environ is None else environ
    fix = (f"unset {' '.join(CLUSTER_ENV)} for an embedded local Ray, or pass --address "
           "HOST:PORT of a running cluster")
    address = env.get("RAY_ADDRESS", "").strip()
    if address and address not in ("local", "auto") and "://" not in address:
        try:
            _probe_address(address)
        except JacpipeError:
            raise JacpipeError(
                f"RAY_ADDRESS={address} is set but no Ray cluster answers there (left over "
                f"from a cluster that is down?): {fix}"
            ) from None
    if env.get("RAY_AUTH_MODE", "").strip().lower() != "token" or env.get("RAY_AUTH_TOKEN"):
        return
    path = env.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        with open(os.path.expanduser(path)) as fh:
            if fh.read().strip():
                return
    except OSError:
        pass
    raise JacpipeError(
        f"RAY_AUTH_MODE=token is set but the token file {path} is missing or empty (left "
        f"over from a cluster that is down?): {fix}"
    )


def _shard_task(spec: ShardSpec, inputs: ShardInputs) -> ShardResult:
    from pipeline.runner.worker import compute_shard

    return compute_shard(spec, inputs)


def _inputs(plan: RunPlan, problem: Problem | None) -> ShardInputs:
    """What every shard of the run receives beside its spec."""
    sparse = plan.coloring is not None
    return ShardInputs(pattern=plan.pattern if sparse else None,
                       coloring=plan.coloring if sparse else None, problem=problem)


_REMOTE: Any = None


def _remote() -> Any:
    """The Ray task: thin wrapper around :func:`pipeline.runner.worker.compute_shard`.

    ``max_calls=0`` keeps worker processes (and their imported torch and
    cached problem) across shards, GPU tasks included (Ray's default for GPU
    tasks would start a new process per task). Worker deaths are retried;
    exceptions of the user's code are not.
    """
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(max_calls=0, max_retries=MAX_RETRIES, retry_exceptions=False)(
            _shard_task
        )
    return _REMOTE


def _describe_failure(exc: BaseException, shard: ShardSpec) -> JacpipeError:
    import ray.exceptions as rex

    where = f"shard {shard.index} (rows {shard.start}..{shard.stop})"
    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, JacpipeError):
            return JacpipeError(f"{where}: {cause}", exit_code=cause.exit_code)
        name = type(cause).__name__ if cause is not None else "error"
        msg = first_line(cause) if cause is not None and str(cause).strip() else ""
        # The remote traceback: ``traceback_str`` on a plain RayTaskError, only
        # its text on the subclass Ray raises for the user's exception type.
        remote_tb = getattr(exc, "traceback_str", None) or str(exc)
        frames = [
            line.strip()
            for line in str(remote_tb).splitlines()
            if line.strip().startswith("File ")
        ]
        user = [f for f in frames if "/pipeline/" not in f and "/torch/" not in f
                and "/ray/" not in f]
        at = f" [{(user or frames or [''])[-1]}]" if frames else ""
        return ShardFailedError(f"{where} failed: {name}: {msg}{at}")
    if isinstance(exc, rex.OutOfMemoryError):
        return ShardFailedError(
            f"{where}: the worker ran out of memory {MAX_RETRIES + 1} times; "
            "lower --memory-budget or use more shards"
        )
    if isinstance(exc, (rex.WorkerCrashedError, rex.NodeDiedError)):
        return ShardFailedError(
            f"{where}: the worker process died {MAX_RETRIES + 1} times ({type(exc).__name__})"
        )
    return ShardFailedError(f"{where}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def run(
    job: str | Any,
    *,
    echo: Callable[[str], None] = print,
    **options: Any,
) -> RunSummary:
    """Run a job end to end: check, plan, compute the shards, commit them (module docstring).

    Examples::

        pipeline.run("mlp", params={"n": 4000}, shards=8, out="out/mlp")
        pipeline.run(Problem(fn=lambda t: torch.tanh(w @ t), x=x0), out="out/step")
        pipeline.run(RunOptions(job="mlp", params=["n=4000"]))

    Args:
        job: a job spec (``"mlp"``, ``"pkg.mod:build"``), a :class:`~pipeline.Problem`
            built in memory (a closure over tensors, an ``nn.Module``: shipped
            to the workers through Ray's object store, its fingerprint checked
            there), or a :class:`~pipeline.core.options.RunOptions`.
        echo: where progress and notes go (one line each).
        **options: the ``jacpipe run`` options by name (``out``, ``shards``,
            ``method``, ``memory_budget``, ``executor``, ...; ``params`` as a
            dict or a list of ``"name=value"``).

    Returns:
        The :class:`RunSummary` (the manifest written, shards computed / resumed).

    Raises:
        JacpipeError: any user-fixable problem, found before Ray starts where
            it can be (options, the job, the plan, the output folder).
        ShardFailedError: the user's function raised in a shard.
        Interrupted: Ctrl-C or SIGTERM (the folder is resumable).
    """
    t_start = time.perf_counter()
    opts, given = _options(job, options)
    opts.check()
    checked = _check_job(opts, given)
    storage = Storage(_uri_or_abspath(default_out(opts.job) if opts.out is None else opts.out))
    if checked.pattern.note and not checked.pattern.quiet:
        echo(f"note: {checked.pattern.note}")
    if opts.address or _ray_running():
        started = connect(opts.address, opts.num_cpus)
        try:
            plan = _plan(opts, checked, cluster_resources(), echo)
            return _execute(opts, checked, plan, ResultFolder(storage), echo, t_start=t_start,
                            executor="ray", owns_ray=started)
        finally:
            if started:
                import ray

                ray.shutdown()
    # An embedded Ray: everything is planned and the folder prepared before it
    # starts, so a typo or a finished result costs no Ray start-up.
    plan = _plan(opts, checked, local_resources(opts.num_cpus), echo)
    executor = _executor(opts, checked, plan, echo)
    return _execute(opts, checked, plan, ResultFolder(storage), echo, t_start=t_start,
                    executor=executor, owns_ray=False)


#: The job name recorded for a Problem handed in memory.
IN_MEMORY = "python:"


def _options(job: Any, options: dict[str, Any]) -> tuple[RunOptions, Any]:
    """``RunOptions`` from the Python API's arguments, and the in-memory Problem if any."""
    from dataclasses import fields

    from pipeline.problem.problem import Problem

    if isinstance(job, RunOptions):
        if options:
            raise JacpipeError("pipeline.run: give RunOptions or keyword options, not both")
        return job, None
    given = job if isinstance(job, Problem) else None
    if given is not None:
        fn = getattr(given.fn, "__qualname__", type(given.fn).__name__)
        job = f"{IN_MEMORY}{getattr(given.fn, '__module__', '?')}.{fn}"
    elif not isinstance(job, str):
        raise JacpipeError(
            f"pipeline.run: expected a job spec (str), a Problem or RunOptions, got "
            f"{type(job).__name__}"
        )
    names = {f.name for f in fields(RunOptions)} - {"job"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise JacpipeError(
            f"pipeline.run: unknown option(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(sorted(names))}"
        )
    params = options.pop("params", [])
    if isinstance(params, dict):
        params = [f"{k}={v}" for k, v in params.items()]
    return RunOptions(job=job, params=list(params), **options), given


def _ray_running() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _plan(opts: RunOptions, job: _Job, resources: Resources, echo: Callable[[str], None]
          ) -> RunPlan:
    plan = make_plan(
        job.shapes, opts, resources, pattern=job.pattern.pattern,
        pattern_source=job.pattern.source, device_param=job.device_param,
        forward_disagrees=None if job.adjoint is None or job.adjoint.agree
        else job.adjoint.reason,
    )
    for note in plan.notes:
        echo(note if note.startswith("warning:") else f"note: {note}")
    if plan.coloring is not None:
        echo(f"sparse: {int(plan.pattern.nnz)} nonzeros, {plan.coloring.num_colors} "
             f"colours ({plan.coloring.mode} mode) instead of "
             f"{min(job.shapes.m, job.shapes.n)} dense passes")
    return plan


def _executor(opts: RunOptions, job: _Job, plan: RunPlan, echo: Callable[[str], None]) -> str:
    """``local`` or ``ray`` for an embedded run (NOTE: [Small jobs in process] in plan.py)."""
    if opts.executor != "auto":
        return opts.executor
    estimate = estimate_seconds(job.shapes, plan, job.pass_seconds)
    if estimate <= LOCAL_MAX_SECONDS:
        echo(f"executor: local (about {estimate:.1f}s of work, less than starting Ray; "
             "--executor ray to use Ray)")
        return "local"
    return "ray"


def cluster_resources() -> Resources:
    """What the connected Ray cluster offers (alive nodes only)."""
    import ray

    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return Resources(
        cpus=float(res.get("CPU", 0)),
        gpus=float(res.get("GPU", 0)),
        node_memory=min((int(n["Resources"].get("memory", 0)) for n in nodes), default=0),
        node_cpus=max((float(n["Resources"].get("CPU", 0)) for n in nodes), default=0.0),
        node_gpus=max((float(n["Resources"].get("GPU", 0)) for n in nodes), default=0.0),
    )


def _manifest(opts: RunOptions, job: _Job, plan: RunPlan) -> Manifest:
    return Manifest(
        job=job.spec,
        params=job.params,
        fingerprint=job.fingerprint,
        method=plan.method,
        layout=plan.layout,  # type: ignore[arg-type]
        plan=[(s.start, s.stop) for s in plan.shards],
        shapes=job.shapes,
        coloring=plan.coloring_facts(),
        options={
            "memory_budget": plan.memory_budget,
            "cpus_per_shard": plan.cpus_per_shard,
            "gpus_per_shard": plan.gpus_per_shard,
            "device": opts.device,
            "group_rows": plan.group_rows,
            "compression": plan.compression,
        },
        run_id=uuid.uuid4().hex[:12],
        created=utcnow(),
        versions=versions(),
        extra={
            **({} if job.adjoint is None else {"adjoint_check": job.adjoint.to_json()}),
            **({} if job.pattern.facts() is None
               else {"sparsity_detection": job.pattern.facts()}),
        },
        smoothing=job.smoothing,
    )


def _spec(opts: RunOptions, job: _Job, plan: RunPlan, shard: Shard, out: str, run_id: str
          ) -> ShardSpec:
    return ShardSpec(
        job=job.spec,
        params=job.params,
        fingerprint=job.fingerprint,
        shapes=job.shapes,
        index=shard.index,
        start=shard.start,
        stop=shard.stop,
        out=out,
        method=plan.method,
        layout=plan.layout,  # type: ignore[arg-type]
        memory_budget=plan.memory_budget,
        threads=plan.threads,
        device=plan.device,
        device_param=job.device_param,
        run_id=run_id,
        group_rows=plan.group_rows,
        chunk_size=opts.chunk_size,
        compression=plan.compression,
        smoothing=job.smoothing,
    )


def _execute(
    opts: RunOptions,
    job: _Job,
    plan: RunPlan,
    folder: ResultFolder,
    echo: Callable[[str], None],
    *,
    t_start: float,
    executor: str,
    owns_ray: bool,
) -> RunSummary:
    """Prepare the folder, compute the shards still to do, and finish the manifest.

    ``executor`` ``ray`` with ``owns_ray`` False and Ray not running starts an
    embedded Ray only now, after the folder is prepared, and only when a
    shard is left to compute.
    """
    manifest = _manifest(opts, job, plan)
    keep = folder.prepare(manifest, resume=opts.resume, overwrite=opts.overwrite)
    try:
        for note in folder.notes:
            echo(f"note: {note}")
        todo = [s for s in plan.shards if s.index not in keep]
        if keep:
            echo(f"resuming: {len(keep)} of {len(plan.shards)} shards already committed")
        specs = [_spec(opts, job, plan, s, folder.storage.uri, manifest.run_id) for s in todo]
        progress = _Progress(len(plan.shards), enabled=opts.progress, echo=echo)
        progress.done_shards = len(keep)
        t_compute = time.perf_counter()
        if specs:
            _compute(specs, opts, job, plan, folder, progress, echo, executor=executor,
                     owns_ray=owns_ray)
        folder.finish(
            "complete",
            wall_seconds=round(time.perf_counter() - t_start, 4),
            compute_seconds=round(time.perf_counter() - t_compute, 4),
        )
    finally:
        folder.unlock()
    notes = list(plan.notes)
    if manifest.nan or manifest.inf:
        bad = [s.index for s in manifest.committed if s.nan or s.inf]
        notes.append(
            f"the result holds {manifest.nan} NaN and {manifest.inf} Inf values "
            f"(shards {', '.join(map(str, bad[:10]))}{'...' if len(bad) > 10 else ''})"
        )
        echo(f"warning: {notes[-1]}")
    return RunSummary(
        out=folder.storage.uri, manifest=manifest, computed=len(todo),
        skipped=len(keep), notes=notes,
    )


def _compute(specs: list[ShardSpec], opts: RunOptions, job: _Job, plan: RunPlan,
             folder: ResultFolder, progress: _Progress, echo: Callable[[str], None], *,
             executor: str, owns_ray: bool) -> None:
    """Run the shards with the executor chosen (starting an embedded Ray if needed)."""
    if executor == "local":
        scheduler: Any = _LocalScheduler(plan, folder, progress, problem=job.problem)
        _schedule(specs, scheduler, plan, folder, progress, owns_ray=True)
        return
    started = False
    if not _ray_running():
        t0 = time.perf_counter()
        echo(f"starting Ray ({opts.num_cpus or int(plan.slots * plan.cpus_per_shard)} CPUs)...")
        started = connect(None, opts.num_cpus)
        echo(f"Ray started in {time.perf_counter() - t0:.1f}s")
    try:
        scheduler = _Scheduler(plan, folder, progress, window=opts.max_in_flight or 2 * plan.slots,
                               shard_timeout=opts.shard_timeout, echo=echo, problem=job.problem)
        _schedule(specs, scheduler, plan, folder, progress, owns_ray=owns_ray or started)
    finally:
        if started:
            import ray

            ray.shutdown()


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a stopped cluster job, ``kill``): handled like Ctrl-C.

    A :class:`KeyboardInterrupt`: Ray's blocking calls (``ray.wait``) check
    signals and let only ``KeyboardInterrupt`` through, as a plain one; any
    other exception raised by the handler there surfaced as "SystemError:
    <cyfunction CoreWorker.wait> returned a result with an exception set"
    and a run marked ``failed``. The handler also records the signal
    (:class:`_Sigterm`), so the run still reports SIGTERM.
    """


class _Sigterm:
    """Whether SIGTERM arrived while :func:`_sigterm_as_interrupt` was installed."""

    received = False


class ShardTimeout(JacpipeError):
    """A shard ran past ``--shard-timeout``; the folder is resumable."""

    exit_code = 1


#: A shard running this many times the median shard time (and at least
#: STALL_MIN_SECONDS) is reported as stalled on the progress line.
STALL_FACTOR = 10.0
STALL_MIN_SECONDS = 60.0
#: Exit code of a run stopped by SIGTERM (128 + 15, as a shell reports it).
SIGTERM_EXIT = 143


@contextlib.contextmanager
def _sigterm_as_interrupt(seen: _Sigterm) -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread for the duration.

    Installed after Ray starts, so it replaces the handler Ray's core worker
    installs (which dumps a C++ stack and aborts): the manifest is written
    ``interrupted`` and the run exits with :data:`SIGTERM_EXIT`. ``seen``
    records the signal even where Ray turns the exception into a plain
    ``KeyboardInterrupt``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        del signum, frame
        seen.received = True
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _Scheduler:
    """Ray tasks for ``specs``, at most ``window`` in flight, committed as they end.

    Watches for stalls: a shard running far past its peers (NOTE: STALL_FACTOR)
    is reported once; one past ``shard_timeout`` seconds fails the run.
    """

    def __init__(self, plan: RunPlan, folder: ResultFolder, progress: _Progress, *,
                 window: int, shard_timeout: float | None, echo: Callable[[str], None],
                 problem: Any = None) -> None:
        self.plan, self.folder, self.progress, self.echo = plan, folder, progress, echo
        self.problem = problem
        self.window, self.shard_timeout = window, shard_timeout
        self.in_flight: dict[Any, ShardSpec] = {}
        self.started: dict[Any, float] = {}  # when a task got (about) a slot
        # shard times so far, kept shards of a resumed result included
        self.seconds = [s.seconds for s in folder.manifest.committed] if folder.manifest else []
        self.warned: set[int] = set()

    def run(self, specs: list[ShardSpec]) -> None:
        import ray

        remote = _remote().options(
            num_cpus=self.plan.cpus_per_shard, num_gpus=self.plan.gpus_per_shard
        )
        # The pattern and colouring go to the object store once, not once per task.
        # A Problem built in memory goes once too (cloudpickled); the worker
        # checks its fingerprint like that of a rebuilt job.
        inputs = ray.put(_inputs(self.plan, self.problem))
        pending = list(specs)
        while pending or self.in_flight:
            while pending and len(self.in_flight) < self.window:
                spec = pending.pop(0)
                self.in_flight[remote.remote(spec, inputs)] = spec
            self._watch(time.perf_counter())
            done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=1.0)
            for ref in done:
                result = _outcome(ref, self.in_flight.pop(ref))
                self.started.pop(ref, None)
                self.seconds.append(result.seconds)
                self.folder.commit(result)
                self.progress.advance(result)

    def _watch(self, now: float) -> None:
        """Start clocks of the tasks holding a slot; report stalls; enforce the timeout."""
        for ref in list(self.in_flight)[: self.plan.slots]:
            self.started.setdefault(ref, now)
        median = sorted(self.seconds)[len(self.seconds) // 2] if self.seconds else None
        for ref, t0 in self.started.items():
            age, spec = now - t0, self.in_flight[ref]
            if self.shard_timeout is not None and age > self.shard_timeout:
                raise ShardTimeout(
                    f"shard {spec.index} (rows {spec.start}..{spec.stop}) ran past "
                    f"--shard-timeout {self.shard_timeout:g}s; {len(self.folder.manifest.shards)}"
                    f" shards are committed in {self.folder.storage.display}: rerun the same "
                    "command to resume"
                )
            stalled = median is not None and age > max(STALL_FACTOR * median, STALL_MIN_SECONDS)
            if stalled and spec.index not in self.warned:
                self.warned.add(spec.index)
                ratio = age / max(median, 1e-9)
                self.echo(
                    f"warning: shard {spec.index} has run {age:.0f}s, {ratio:.0f}x "
                    f"the median shard ({median:.1f}s): a stalled or stopped worker? "
                    "(--shard-timeout SECONDS fails the run, resumably)"
                )


def _schedule(
    specs: list[ShardSpec],
    scheduler: Any,
    plan: RunPlan,
    folder: ResultFolder,
    progress: _Progress,
    *,
    owns_ray: bool,
) -> None:
    """Run ``specs`` with ``scheduler`` (Ray tasks or this process), committing each as it ends.

    On Ctrl-C, SIGTERM or a failure the manifest is written first
    (``interrupted`` / ``failed``), then the tasks in flight are left (NOTE:
    [Stopping tasks without ray.cancel]).
    """
    sigterm = _Sigterm()
    try:
        with _sigterm_as_interrupt(sigterm), progress:
            scheduler.run(specs)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        # The manifest first: whatever happens next, the folder says what it holds.
        folder.finish("interrupted")
        if not owns_ray:
            _abandon(scheduler.in_flight)
        committed = len(folder.manifest.shards) if folder.manifest else 0
        terminated = isinstance(exc, Terminated) or sigterm.received
        raise Interrupted(
            f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: "
            f"{committed} of {len(plan.shards)} shards committed in "
            f"{folder.storage.display}; rerun the same command to resume",
            exit_code=SIGTERM_EXIT if terminated else None,
        ) from None
    except BaseException:
        folder.finish("failed")
        if not owns_ray:
            _abandon(scheduler.in_flight)
        raise


class _LocalScheduler:
    """The shards one after the other in this process: the same ``compute_shard`` as a task."""

    def __init__(self, plan: RunPlan, folder: ResultFolder, progress: _Progress, *,
                 problem: Any = None) -> None:
        self.plan, self.folder, self.progress, self.problem = plan, folder, progress, problem
        self.in_flight: dict[Any, ShardSpec] = {}

    def run(self, specs: list[ShardSpec]) -> None:
        from pipeline.runner.worker import compute_shard

        for spec in specs:
            try:
                result = compute_shard(spec, _inputs(self.plan, self.problem))
            except JacpipeError as exc:
                raise JacpipeError(f"shard {spec.index} (rows {spec.start}..{spec.stop}): {exc}",
                                   exit_code=exc.exit_code) from None
            except Exception as exc:  # noqa: BLE001 - the user's code: one line
                raise ShardFailedError(
                    f"shard {spec.index} (rows {spec.start}..{spec.stop}) failed: "
                    f"{type(exc).__name__}: {first_line(exc)}{_user_frame(exc)}"
                ) from None
            self.folder.commit(result)
            self.progress.advance(result)


def _user_frame(exc: BaseException) -> str:
    """`` [File ...]``: the innermost frame of the traceback outside jacpipe, torch and Ray."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not any(p in f.filename for p in ("/pipeline/", "/torch/",
                                                                     "/ray/"))]
    f = (user or frames or [None])[-1]
    return f" [File \"{f.filename}\", line {f.lineno}, in {f.name}]" if f else ""


def _outcome(ref: Any, spec: ShardSpec) -> ShardResult:
    import ray

    try:
        return ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - turned into one message
        raise _describe_failure(exc, spec) from None


def _abandon(in_flight: dict[Any, Any]) -> None:
    """Leave the tasks in flight on a Ray session we do not own, fetching what is done.

    NOTE: [Stopping tasks without ray.cancel]
        ``ray.cancel`` (forced or not) races with a task that completes or is
        retried at that moment, inside Ray's core worker: a ``RAY_CHECK``
        aborts the whole driver process ("Tried to complete task that was not
        pending", ray-project/ray issue 54260; measured here with Ray 2.60 in 2
        of 6 Ctrl-C runs, and in the fake-GPU test's failing runs). So jacpipe
        never cancels. An embedded Ray is shut down right after, which kills
        its workers; a driver of a cluster (``--address``, ``jacpipe submit``)
        exits, and Ray kills the tasks it owns. Only a caller's own Ray session
        (the Python API after ``ray.init``) lets the shards in flight run to
        their end; what they write is never committed (the manifest was written
        before this). Should one of them replace a part that a rerun started
        meanwhile has committed, that part fails its checksum on reading and
        the next resume recomputes it: detected, never silently mixed.

    Outcomes already in are fetched, so Ray does not log them later as
    "Unhandled error" tracebacks after the run reported its one-line error.
    """
    import ray

    refs = list(in_flight)
    if not refs:
        return
    try:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    except Exception:  # noqa: BLE001 - best effort
        return
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - already reported
            pass


class _Progress:
    """A rich progress bar (shards, rows/s, ETA) or plain lines when not a terminal."""

    def __init__(self, shards: int, *, enabled: bool, echo: Callable[[str], None]) -> None:
        self.shards, self.enabled, self.echo = shards, enabled, echo
        self.done_shards = 0
        self.done_rows = 0
        self._bar: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()
        self._last_line = 0.0

    def __enter__(self) -> _Progress:
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]shards"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[rate]} rows/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(
                "run", total=self.shards, completed=self.done_shards, rate="-"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, result: ShardResult) -> None:
        self.done_shards += 1
        self.done_rows += result.rows
        rate = self.done_rows / max(time.perf_counter() - self._t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done_shards, rate=f"{rate:,.0f}")
        elif self.enabled:
            now = time.perf_counter()
            if now - self._last_line > 5 or self.done_shards == self.shards:
                self._last_line = now
                self.echo(
                    f"shards {self.done_shards}/{self.shards}  {rate:,.0f} rows/s  "
                    f"elapsed {now - self._t0:.1f}s"
                )


def format_exception_line(exc: BaseException) -> str:
    """One line for an unexpected exception (used by the CLI's last-resort handler)."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"
