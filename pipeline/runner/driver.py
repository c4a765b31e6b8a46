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
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions, python_spelling
from pipeline.core.shard import ShardSpec
from pipeline.problem.problem import (
    Problem,
)
from pipeline.runner.cluster import (
    cluster_resources,
    connect,
    embedded_running,
    ray_running,
    shutdown,
    start_embedded,
)
from pipeline.runner.job import CheckedJob, check_job
from pipeline.runner.plan import (
    Resources,
    RunPlan,
    Shard,
    local_resources,
    make_plan,
    stored_row_bytes,
)
from pipeline.runner.progress import Progress, slow_phase
from pipeline.runner.scheduler import (
    Executor,
    Interrupted,
    LocalExecutor,
    RayExecutor,
    gather_rows,
    schedule,
)
from pipeline.store.folder import ResultFolder, default_out
from pipeline.store.manifest import Manifest, utcnow, versions
from pipeline.store.storage import Storage

__all__ = ["Interrupted", "RunOptions", "RunSummary", "connect", "run", "run_command", "shutdown"]


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


def _uri_or_abspath(out: str) -> str:
    return out if "://" in out else os.path.abspath(out)


# ---------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def run(
    job: str | Any,
    *,
    echo: Callable[[str], None] | None = None,
    **options: Any,
) -> RunSummary:
    """Run a job end to end: check, plan, compute the shards, commit them (module docstring).

    Examples::

        pipeline.run("mlp", params={"n": 4000}, shards=8, out="out/mlp")
        pipeline.run(Problem(fn=lambda t: torch.tanh(w @ t), x=x0), out="out/step")
        pipeline.run(RunOptions(job="mlp", params=["n=4000"]))

    An embedded Ray that a run starts stays up for the later runs of this
    process (NOTE: [One embedded Ray per process]); ``pipeline.shutdown()``
    stops it. Calling it again with the same ``out`` resumes, or returns at
    once when every shard is committed.

    Args:
        job: a job spec (``"mlp"``, ``"pkg.mod:build"``), a :class:`~pipeline.Problem`
            built in memory (a closure over tensors, an ``nn.Module``: shipped
            to the workers through Ray's object store, its fingerprint checked
            there), or a :class:`~pipeline.core.options.RunOptions`.
        echo: where progress and notes go (one line each); default: the
            ``pipeline`` logger (``logging.basicConfig(level=logging.INFO)``
            shows them on stderr; warnings show without it).
        **options: the ``jacpipe run`` options by name (``out``, ``shards``,
            ``method``, ``memory_budget``, ``executor``, ...; ``params`` as a
            dict or a list of ``"name=value"``).

    Returns:
        The :class:`RunSummary` (the manifest written, shards computed / resumed).

    Raises:
        JacpipeError: any user-fixable problem, found before Ray starts where
            it can be (options, the job, the plan, the output folder), naming
            the Python arguments (``overwrite=True``, not ``--overwrite``).
        ShardFailedError: the user's function raised in a shard.
        Interrupted: Ctrl-C or SIGTERM (the folder is resumable).
    """
    t_start = time.perf_counter()
    echo = echo or log_line
    with python_errors():
        opts, given = options_from(job, options)
        return run_checked(opts, _checked(opts, given, echo), echo, keep_ray=True,
                           t_start=t_start)


def run_command(options: RunOptions, echo: Callable[[str], None], *,
                on_checked: Callable[[CheckedJob], None] | None = None) -> RunSummary:
    """``jacpipe run``: :func:`run`, its errors naming flags, an embedded Ray stopped at its end.

    With ``--executor ray`` on an embedded Ray, Ray starts while the job is
    checked (NOTE: [Ray starts while the job is checked]).

    Args:
        on_checked: called with the checked job (its ``built`` problem kept)
            as soon as the checks pass, where Ray starts while the job is
            checked (the shards then run on Ray, none in this process):
            ``run --verify`` starts its reference there (NOTE: [The reference
            while Ray starts]).
    """
    t_start = time.perf_counter()
    if not _starts_ray_early(options):
        return run_checked(options, _checked(options, None, echo), echo, keep_ray=False,
                           t_start=t_start)
    try:
        checked, warming = _checked_while_ray_starts(options, echo, on_checked)
        return run_checked(options, checked, echo, keep_ray=False, t_start=t_start,
                           warming=warming)
    finally:
        shutdown()  # a no-op when the run stopped it already


def _starts_ray_early(opts: RunOptions) -> bool:
    """Whether ``jacpipe run`` may start Ray before its checks end (cheap checks done here).

    Only where the run needs an embedded Ray whatever the checks find: ``--executor
    ray`` on CPUs (no GPU share to place), no cluster, no Ray of the caller's, and a
    folder that is new or that the run replaces (``--overwrite``, or ``--no-resume``
    over a result of the same job and parameters). A folder to resume or to refuse,
    like ``--executor auto``, waits for the checks as before (a finished result
    starts no Ray).

    Raises:
        JacpipeError: the options, the job spec or a parameter are wrong
            (before any Ray start-up, as without the overlap).
    """
    opts.check()
    if opts.executor != "ray" or opts.address or ray_running():
        return False
    cpus = local_resources(opts.num_cpus).cpus
    if opts.gpus_per_shard or opts.device == "cuda" or opts.cpus_per_shard > cpus:
        return False  # the plan refuses or places GPU shares: it decides before Ray
    params: dict[str, Any] = {}
    if not opts.job.startswith(IN_MEMORY):
        from pipeline.problem.problem import (
            job_parameters,
            parse_params,
            resolve_builder,
            static_parameters,
        )

        known = static_parameters(opts.job)  # NOTE: [Parameters without imports]
        if known is None:
            known = job_parameters(resolve_builder(opts.job))
        params = parse_params(known, opts.params)
        if opts.dtype is not None:
            if "dtype" not in known:
                return False  # check_job refuses it, before Ray
            params["dtype"] = opts.dtype
    storage = Storage(_uri_or_abspath(default_out(opts.job) if opts.out is None else opts.out))
    try:
        names = storage.listdir() if storage.is_dir() else []
        old = Manifest.read(storage) if names else None
    except (JacpipeError, OSError):
        return False  # prepare() says what is wrong with the folder, before Ray
    if old is None:
        return not names  # files but no result: prepare() refuses them, before Ray
    if opts.overwrite:
        return True
    import json

    same = old.job == opts.job and old.params == json.loads(json.dumps(params, default=str))
    return same and not opts.resume


def _checked_while_ray_starts(opts: RunOptions, echo: Callable[[str], None],
                              on_checked: Callable[[CheckedJob], None] | None = None,
                              ) -> tuple[CheckedJob, list[Any]]:
    """Check the job in a thread while this one starts the embedded Ray and warms its workers.

    NOTE: [Ray starts while the job is checked]
        ``make run`` spent 3 s building and checking the job (fingerprint,
        random-op watch, vmap spot check), then 3-9 s starting Ray, then
        2 s while the workers imported torch, one after the other. When the
        run will need an embedded Ray whatever the checks find
        (:func:`_starts_ray_early`), ``ray.init`` runs in the main thread
        (where Ray installs its signal handlers, and where a SIGTERM while it
        starts becomes one line: :func:`~pipeline.runner.cluster._init_ray`)
        while :func:`~pipeline.runner.job.check_job` runs in a thread; the
        warm-up tasks (NOTE: [Warm workers]) go out as soon as Ray is up, so
        the workers import torch while the checks finish. Cheap checks (the
        options, the job spec, the parameters, the folder) still come before
        Ray starts. A check that fails, a SIGTERM or a Ctrl-C stops the Ray
        started here before the error goes on, unchanged.

    Returns:
        The checked job, and the warm-up tasks submitted.
    """
    import threading

    from pipeline.runner.scheduler import warm_workers

    box: dict[str, Any] = {}

    def check() -> None:
        try:
            box["job"] = check_job(opts, None, keep_built=on_checked is not None)
            if on_checked is not None:
                on_checked(box["job"])
        except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
            box["error"] = exc

    thread = threading.Thread(target=check, name="jacpipe-check", daemon=True)
    cpus = opts.num_cpus or os.cpu_count() or 1
    with slow_phase(echo, f"starting Ray ({cpus} CPUs) while checking the job (build, "
                    "fingerprint, detecting sparsity)", enabled=opts.progress):
        thread.start()
        try:
            t0 = time.perf_counter()
            start_embedded(opts.num_cpus)
            echo(f"Ray started in {time.perf_counter() - t0:.1f}s")
            ray_cpus = int(cluster_resources().cpus) or 1
            warming = warm_workers(min(ray_cpus, opts.shards or ray_cpus))
            while thread.is_alive():  # a timed join: signals are handled meanwhile
                thread.join(0.2)
        except BaseException:
            shutdown()
            raise
    if "error" in box:
        shutdown()
        raise box["error"]
    return box["job"], warming


def _checked(opts: RunOptions, given: Problem | None, echo: Callable[[str], None]
             ) -> CheckedJob:
    opts.check()
    with slow_phase(echo, "checking the job (build, fingerprint, detecting sparsity)",
                    enabled=opts.progress):
        return check_job(opts, given)


@contextlib.contextmanager
def python_errors() -> Iterator[None]:
    """Spell the flags of a :class:`JacpipeError` raised inside as Python arguments.

    The same exception (type, exit code, traceback) goes on; only its line changes
    (:func:`~pipeline.core.options.python_spelling`).
    """
    try:
        yield
    except JacpipeError as exc:
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (python_spelling(exc.args[0]), *exc.args[1:])
        raise


#: The logger of the Python API's notes and progress lines (``echo``'s default).
LOG = logging.getLogger("pipeline")


def log_line(line: str) -> None:
    """One line of a run to the ``pipeline`` logger: warnings as warnings, the rest as info."""
    if line.startswith("warning: "):
        LOG.warning(line.removeprefix("warning: "))
    else:
        LOG.info(line)


def run_checked(opts: RunOptions, checked: CheckedJob, echo: Callable[[str], None], *,
                keep_ray: bool, t_start: float | None = None,
                warming: list[Any] | None = None) -> RunSummary:
    """Run a checked job: connect or plan for the embedded Ray, then :func:`_execute`.

    Args:
        keep_ray: keep an embedded Ray started here for later runs (the Python
            API) or stop it at the end (``jacpipe run``).
        warming: warm-up tasks already submitted to the embedded Ray.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    storage = Storage(_uri_or_abspath(default_out(opts.job) if opts.out is None else opts.out))
    if checked.pattern.note and not checked.pattern.quiet:
        echo(f"note: {checked.pattern.note}")
    if opts.address and embedded_running():
        shutdown()  # this run goes to a cluster: the embedded Ray is not it
    if opts.address or (ray_running() and not embedded_running()):
        started = connect(opts.address, opts.num_cpus)
        try:
            plan = _plan(opts, checked, cluster_resources(), echo, embedded=False)
            return _execute(opts, checked, plan, ResultFolder(storage), echo, t_start=t_start,
                            owns_ray=started, keep_ray=True)
        finally:
            if started:
                import ray

                ray.shutdown()
    # An embedded Ray: everything is planned and the folder prepared before it
    # starts, so a typo or a finished result costs no Ray start-up.
    plan = _plan(opts, checked, local_resources(opts.num_cpus), echo, embedded=True)
    return _execute(opts, checked, plan, ResultFolder(storage), echo, t_start=t_start,
                    owns_ray=False, keep_ray=keep_ray, warming=warming)


#: The job name recorded for a Problem handed in memory.
IN_MEMORY = "python:"


def options_from(job: Any, options: dict[str, Any], *, caller: str = "run"
             ) -> tuple[RunOptions, Any]:
    """``RunOptions`` from the Python API's arguments, and the in-memory Problem if any."""
    from dataclasses import fields

    if isinstance(job, RunOptions):
        if options:
            raise JacpipeError(f"pipeline.{caller}: give RunOptions or keyword options, not both")
        return job, None
    given = job if isinstance(job, Problem) else None
    if given is not None:
        fn = getattr(given.fn, "__qualname__", type(given.fn).__name__)
        job = f"{IN_MEMORY}{getattr(given.fn, '__module__', '?')}.{fn}"
    elif not isinstance(job, str):
        raise JacpipeError(
            f"pipeline.{caller}: expected a job spec (str), a Problem or RunOptions, got "
            f"{type(job).__name__}"
        )
    names = {f.name for f in fields(RunOptions)} - {"job"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise JacpipeError(
            f"pipeline.{caller}: unknown option(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(sorted(names))}"
        )
    if isinstance(options.get("compile"), bool):  # compile=True / False, as the engine's
        options = {**options, "compile": "on" if options["compile"] else "off"}
    params = options.pop("params", [])
    if isinstance(params, dict):
        params = [f"{k}={v}" for k, v in params.items()]
    return RunOptions(job=job, params=list(params), **options), given


def _plan(opts: RunOptions, job: CheckedJob, resources: Resources, echo: Callable[[str], None],
          *, embedded: bool) -> RunPlan:
    """The one planning call (:func:`~pipeline.runner.plan.make_plan`), its notes echoed."""
    with slow_phase(echo, "planning (colouring)" if job.pattern.pattern is not None
                    else "planning", enabled=opts.progress):
        plan = _make_plan(opts, job, resources, embedded=embedded)
    # The colouring of a sparse run is one of the plan's notes (printed once here).
    for note in plan.notes:
        echo(note if note.startswith("warning:") else f"note: {note}")
    return plan


def _make_plan(opts: RunOptions, job: CheckedJob, resources: Resources, *, embedded: bool
               ) -> RunPlan:
    return make_plan(
        job.shapes, opts, resources, pattern=job.pattern.pattern,
        pattern_source=job.pattern.source, device_param=job.device_param,
        forward_disagrees=None if job.adjoint is None or job.adjoint.agree
        else job.adjoint.reason,
        pass_seconds=job.pass_seconds if embedded else None,
        vectorise=job.spot is None or job.spot.agree,
    )


def _warn_if_disk_too_small(job: CheckedJob, plan: RunPlan, todo: list[Any], storage: Storage,
                            echo: Callable[[str], None]) -> None:
    """One warning line when the rows still to write exceed the free space of ``--out``.

    A warning, not a refusal: the estimate is of uncompressed values
    (compression usually shrinks them), and a run that meets a full disk
    stops resumably (free some space and rerun the same command).
    """
    pattern = plan.pattern if plan.coloring is not None else None
    planned = stored_row_bytes(job.shapes, pattern) * sum(s.stop - s.start for s in todo)
    free = storage.free_bytes()
    if free is None or planned <= free:
        return
    echo(f"warning: the result needs about {_size(planned)} (uncompressed) and the file system "
         f"of {storage.display} has {_size(free)} free; the run may stop with 'no space left' "
         "(free some space and rerun the same command to resume)")


def _size(n: int) -> str:
    """Bytes as a short decimal size (``2.4 kB``, ``150.0 GB``)."""
    size, unit = float(n), "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


def _manifest(opts: RunOptions, job: CheckedJob, plan: RunPlan) -> Manifest:
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
            **({} if job.spot is None else {"vmap_check": job.spot.to_json()}),
            **({} if job.pattern.facts() is None
               else {"sparsity_detection": job.pattern.facts()}),
        },
        smoothing=job.smoothing,
    )


def _spec(opts: RunOptions, job: CheckedJob, plan: RunPlan, shard: Shard, out: str, run_id: str
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
        forward=plan.forward,
        vectorise=plan.vectorise,
        compile=opts.compile,
    )


def _stops_resumably(execute: Callable[..., RunSummary]) -> Callable[..., RunSummary]:
    """SIGTERM or Ctrl-C outside the shard loop (Ray starting, say): one line, folder resumable.

    The shard loop says so itself (:func:`~pipeline.runner.scheduler.schedule`);
    before it, a SIGTERM killed the driver without a line, its manifest left
    ``running``. ``execute`` marks the folder ``interrupted``; this says how far it got.
    """
    import functools

    from pipeline.core.signals import SIGTERM_EXIT, SigtermSeen, Terminated, sigterm_as_interrupt

    @functools.wraps(execute)
    def wrapper(opts: RunOptions, job: CheckedJob, plan: RunPlan, folder: ResultFolder,
                *args: Any, **kwargs: Any) -> RunSummary:
        seen = SigtermSeen()
        try:
            with sigterm_as_interrupt(seen):
                return execute(opts, job, plan, folder, *args, **kwargs)
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated) or seen.received
            committed = len(folder.manifest.shards) if folder.manifest else 0
            raise Interrupted(
                f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: {committed} of "
                f"{len(plan.shards)} shards committed in {folder.storage.display}; rerun the "
                "same command to resume",
                exit_code=SIGTERM_EXIT if terminated else None,
            ) from None

    return wrapper


@_stops_resumably
def _execute(
    opts: RunOptions,
    job: CheckedJob,
    plan: RunPlan,
    folder: ResultFolder,
    echo: Callable[[str], None],
    *,
    t_start: float,
    owns_ray: bool,
    keep_ray: bool,
    warming: list[Any] | None = None,
) -> RunSummary:
    """Prepare the folder, compute the shards still to do, and finish the manifest.

    ``plan.executor`` ``ray`` with ``owns_ray`` False and Ray not running starts an
    embedded Ray only now, after the folder is prepared, and only when a
    shard is left to compute.
    """
    manifest = _manifest(opts, job, plan)
    keep = folder.prepare(manifest, resume=opts.resume, overwrite=opts.overwrite)
    plan = dataclasses.replace(plan, compression=manifest.options["compression"])  # auto resolved
    try:
        for note in folder.notes:
            echo(f"note: {note}")
        todo = [s for s in plan.shards if s.index not in keep]
        _warn_if_disk_too_small(job, plan, todo, folder.storage, echo)
        if keep:
            echo(f"resuming: {len(keep)} of {len(plan.shards)} shards already committed")
        specs = [_spec(opts, job, plan, s, folder.storage.uri, manifest.run_id) for s in todo]
        progress = Progress(len(plan.shards), enabled=opts.progress, echo=echo)
        progress.done_shards = len(keep)
        t_compute = time.perf_counter()
        if specs:
            _compute(specs, opts, job, plan, folder, progress, echo, owns_ray=owns_ray,
                     keep_ray=keep_ray, warming=warming)
        folder.finish(
            "complete",
            wall_seconds=round(time.perf_counter() - t_start, 4),
            compute_seconds=round(time.perf_counter() - t_compute, 4),
        )
    except KeyboardInterrupt:  # outside the shard loop, e.g. while Ray starts: resumable
        folder.finish("interrupted")
        raise
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
    for line in dict.fromkeys(line for s in manifest.committed for line in s.checks):
        notes.append(line)  # the engine's own checks, once each (also in each shard's entry)
        echo(f"warning: {line}")
    return RunSummary(
        out=folder.storage.uri, manifest=manifest, computed=len(todo),
        skipped=len(keep), notes=notes,
    )


def _compute(specs: list[ShardSpec], opts: RunOptions, job: CheckedJob, plan: RunPlan,
             folder: ResultFolder, progress: Progress, echo: Callable[[str], None], *,
             owns_ray: bool, keep_ray: bool, warming: list[Any] | None = None) -> None:
    """Run the shards with the executor chosen (starting an embedded Ray if needed).

    The embedded Ray (NOTE: [One embedded Ray per process]) stays up after a
    run that succeeds when ``keep_ray``; a failed or interrupted run stops it,
    which stops the tasks it left in flight.
    """
    if plan.executor == "local":
        scheduler: Executor = LocalExecutor(plan, folder, progress, problem=job.problem)
        schedule(specs, scheduler, plan, folder, progress, owns_ray=True)
        return
    with progress:  # the spinner (or heartbeat) turns while Ray starts
        started = _ray_up(opts, plan, progress, echo)
        embedded = embedded_running()
        try:
            scheduler = RayExecutor(plan, folder, progress,
                                    window=opts.max_in_flight or 2 * plan.slots,
                                    shard_timeout=opts.shard_timeout, echo=echo,
                                    problem=job.problem, warm=started, warming=warming)
            schedule(specs, scheduler, plan, folder, progress, owns_ray=owns_ray or embedded)
        except BaseException:
            if embedded:
                shutdown()
            raise
    if embedded and not keep_ray:
        shutdown()


def _ray_up(opts: RunOptions, plan: RunPlan, progress: Progress, echo: Callable[[str], None]
            ) -> bool:
    """Start (or keep) the embedded Ray unless the caller's Ray is up; True if started now."""
    if ray_running() and not embedded_running():
        return False
    t0 = time.perf_counter()
    cpus = opts.num_cpus or int(plan.slots * plan.cpus_per_shard)
    if not embedded_running():
        progress.phase(f"starting Ray ({cpus} CPUs)")
    started = start_embedded(opts.num_cpus)
    if started:
        echo(f"Ray started in {time.perf_counter() - t0:.1f}s")
    return started


def rows_on_ray(opts: RunOptions, job: CheckedJob, plan: RunPlan,
                echo: Callable[[str], None]) -> list[Any]:
    """A dense result computed by Ray tasks and kept in memory: its blocks, in row order.

    ``pipeline.jacobian`` without ``out``: the plan's shards, each a task
    returning its rows (:func:`~pipeline.runner.scheduler.gather_rows`); no
    folder. The embedded Ray stays up; a failure or Ctrl-C stops it.
    """
    if opts.address and embedded_running():
        shutdown()
    if opts.address:
        connect(opts.address, opts.num_cpus)
    run_id = uuid.uuid4().hex[:12]
    specs = [_spec(opts, job, plan, s, "", run_id) for s in plan.shards]
    progress = Progress(len(specs), enabled=opts.progress, echo=echo)
    with progress:
        _ray_up(opts, plan, progress, echo)
        embedded = embedded_running()
        try:
            return gather_rows(specs, plan, progress, problem=job.problem)
        except BaseException:
            if embedded:
                shutdown()
            raise
