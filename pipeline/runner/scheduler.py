"""Running shards: one loop over an executor (Ray tasks, or this process), committing each.

An executor has ``run(specs)`` and ``in_flight``; the loop around it
(:func:`schedule`) owns signals, the final manifest status and the tasks
left in flight. The Ray executor keeps a bounded window of tasks, watches
for stragglers and turns Ray's failures into one line.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.core.errors import JacpipeError, ShardFailedError, first_line
from pipeline.core.shard import ShardInputs, ShardResult, ShardSpec
from pipeline.core.signals import SIGTERM_EXIT, Terminated
from pipeline.core.signals import SigtermSeen as _Sigterm
from pipeline.core.signals import sigterm_as_interrupt as _sigterm_as_interrupt
from pipeline.problem.problem import (
    Problem,
)
from pipeline.runner.plan import (
    RunPlan,
)
from pipeline.runner.progress import Progress
from pipeline.store.folder import ResultFolder

if TYPE_CHECKING:
    from pipeline.problem.problem import Problem


#: How often Ray retries a shard whose worker process died (SIGKILL, OOM).
MAX_RETRIES = 3


class Interrupted(JacpipeError):
    """Ctrl-C: tasks stopped (NOTE: [Stopping tasks without ray.cancel]), folder resumable."""

    exit_code = 130


def _shard_task(spec: ShardSpec, inputs: ShardInputs) -> ShardResult:
    from pipeline.runner.worker import compute_shard

    return compute_shard(spec, inputs)


def _inputs(plan: RunPlan, problem: Problem | None) -> ShardInputs:
    """What every shard of the run receives beside its spec."""
    sparse = plan.coloring is not None
    return ShardInputs(pattern=plan.pattern if sparse else None,
                       coloring=plan.coloring if sparse else None, problem=problem)


_REMOTE: Any = None


def _warm_task() -> int:
    """Import what a shard needs (torch, the worker), so the first shard finds it loaded."""
    import pipeline.runner.worker  # noqa: F401

    return os.getpid()


def warm_workers(count: int, *, cpus: float = 1, gpus: float = 0) -> list[Any]:
    """Submit ``count`` tasks that import torch and the worker (NOTE: [Warm workers]).

    The driver calls it right after an embedded Ray starts (while the job is
    still being checked: NOTE: [Ray starts while the job is checked]) and
    hands the refs to :class:`RayExecutor` (``warming``), which reports them
    as ``workers ready k/N``.
    """
    import ray

    warm = ray.remote(max_retries=0)(_warm_task).options(num_cpus=cpus, num_gpus=gpus)
    return [warm.remote() for _ in range(count)]


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


def _rows_task(spec: ShardSpec, inputs: ShardInputs) -> Any:
    from pipeline.runner.worker import compute_rows

    return compute_rows(spec, inputs)


_ROWS_REMOTE: Any = None


def gather_rows(specs: list[ShardSpec], plan: RunPlan, progress: Progress, *,
                problem: Problem | None = None) -> list[Any]:
    """The rows of ``specs`` computed by Ray tasks and returned through the object store.

    For a result that fits in memory (``pipeline.jacobian`` without ``out``):
    no folder, no part files; the same task options, retries of dead workers
    and one-line failures as :class:`RayExecutor`.

    Returns:
        One ``(rows, n)`` numpy array per spec, in the order of ``specs``.

    Raises:
        ShardFailedError: the user's function raised in a task.
        Interrupted: Ctrl-C or SIGTERM.
    """
    import ray

    global _ROWS_REMOTE
    if _ROWS_REMOTE is None:
        _ROWS_REMOTE = ray.remote(max_calls=0, max_retries=MAX_RETRIES,
                                  retry_exceptions=False)(_rows_task)
    remote = _ROWS_REMOTE.options(num_cpus=plan.cpus_per_shard, num_gpus=plan.gpus_per_shard)
    inputs = ray.put(_inputs(plan, problem))
    pending = {remote.remote(spec, inputs): spec for spec in specs}
    blocks: dict[int, Any] = {}
    sigterm = _Sigterm()
    try:
        with _sigterm_as_interrupt(sigterm), progress:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in done:
                    spec = pending.pop(ref)
                    blocks[spec.index] = _outcome(ref, spec)
                    progress.advance_rows(spec.rows)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated) or sigterm.received
        raise Interrupted("terminated (SIGTERM)" if terminated else "interrupted",
                          exit_code=SIGTERM_EXIT if terminated else None) from None
    finally:
        _abandon(pending)
    return [blocks[spec.index] for spec in specs]


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


class ShardTimeout(JacpipeError):
    """A shard ran past ``--shard-timeout``; the folder is resumable."""

    exit_code = 1


#: A shard running this many times the median shard time (and at least
#: STALL_MIN_SECONDS) is reported as stalled on the progress line.
STALL_FACTOR = 10.0


STALL_MIN_SECONDS = 60.0


class RayExecutor:
    """Ray tasks for ``specs``, at most ``window`` in flight, committed as they end.

    Watches for stalls: a shard running far past its peers (NOTE: STALL_FACTOR)
    is reported once; one past ``shard_timeout`` seconds fails the run.
    """

    def __init__(self, plan: RunPlan, folder: ResultFolder, progress: Progress, *,
                 window: int, shard_timeout: float | None, echo: Callable[[str], None],
                 problem: Problem | None = None, warm: bool = False,
                 warming: list[Any] | None = None) -> None:
        self.plan, self.folder, self.progress, self.echo = plan, folder, progress, echo
        self.warm = warm
        self.early = warming or []  # warm-up tasks submitted while the driver checked
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
        # Fresh workers import torch first (NOTE: [Warm workers]).
        if self.early:
            warming = self._adopt(self.early)
        else:
            warming = self._warm_up(min(self.plan.slots, len(specs))) if self.warm else []
        inputs = ray.put(_inputs(self.plan, self.problem))
        pending = list(specs)
        while pending or self.in_flight:
            while pending and len(self.in_flight) < self.window:
                spec = pending.pop(0)
                self.in_flight[remote.remote(spec, inputs)] = spec
            self._watch(time.perf_counter())
            if warming:
                warming = self._warmed(warming)
            done, _ = ray.wait(list(self.in_flight), num_returns=1,
                               timeout=0.25 if warming else 1.0)
            for ref in done:
                result = _outcome(ref, self.in_flight.pop(ref))
                self.started.pop(ref, None)
                self.seconds.append(result.seconds)
                self.folder.commit(result)
                self.progress.advance(result)

    def _warm_up(self, count: int) -> list[Any]:
        """Start ``count`` tasks that import torch and the worker, ahead of the shards.

        NOTE: [Warm workers]
            A fresh embedded Ray's workers each import torch (seconds on a
            loaded machine) before their first shard. One small task per
            slot, submitted before the problem is pickled and put in the
            object store, starts that import at once; it holds the slot
            only while importing (what the first shard would have done), and
            the worker it leaves, torch loaded, takes the next shard (Ray
            reuses idle workers across functions). Their completions give
            the ``workers ready k/N`` phase.
        """
        refs = warm_workers(count, cpus=self.plan.cpus_per_shard, gpus=self.plan.gpus_per_shard)
        return self._adopt(refs)

    def _adopt(self, refs: list[Any]) -> list[Any]:
        """Follow warm-up tasks (``workers ready k/N``), however early they were submitted."""
        self._warm_total, self._kept = len(refs), self.progress.done_shards
        self.progress.phase(f"workers ready 0/{len(refs)}")
        return self._warmed(refs)

    def _warmed(self, warming: list[Any]) -> list[Any]:
        """The warm-up tasks still running; the phase line when some ended."""
        import ray

        ready, rest = ray.wait(warming, num_returns=len(warming), timeout=0)
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - a shard on that worker reports it properly
                pass
        if ready and self.progress.done_shards == self._kept:
            self.progress.phase(f"workers ready {self._warm_total - len(rest)}/{self._warm_total}")
        return rest

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


class Executor(Protocol):
    """Where shards compute: :class:`RayExecutor` (Ray tasks) or :class:`LocalExecutor`.

    ``run`` computes ``specs``, committing each result to the folder and
    advancing the progress as it ends; ``in_flight`` maps what is still
    running to its spec (what :func:`schedule` abandons on Ctrl-C).
    """

    in_flight: dict[Any, ShardSpec]

    def run(self, specs: list[ShardSpec]) -> None: ...


def schedule(
    specs: list[ShardSpec],
    scheduler: Executor,
    plan: RunPlan,
    folder: ResultFolder,
    progress: Progress,
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


class LocalExecutor:
    """The shards one after the other in this process: the same ``compute_shard`` as a task."""

    def __init__(self, plan: RunPlan, folder: ResultFolder, progress: Progress, *,
                 problem: Problem | None = None) -> None:
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
