"""The driver: prepare the folder, connect Ray, run shards in a bounded window, commit.

The driver holds metadata only: each Ray task computes and writes its own
shard and returns a small dict; the driver appends it to the manifest
(rewritten atomically after every shard), so a killed driver loses nothing
that was committed, and a rerun resumes from the manifest.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import plan as planning
from pipeline.errors import JacpipeError, ShardFailedError
from pipeline.problem import (
    Shapes,
    build_problem,
    check_fingerprint,
    fingerprint,
    job_parameters,
    parse_params,
    resolve_builder,
    validate,
)

#: How often Ray retries a shard whose worker process died (SIGKILL, OOM).
MAX_RETRIES = 3


class Interrupted(JacpipeError):
    """Ctrl-C: tasks stopped (NOTE: [Stopping tasks without ray.cancel]), folder resumable."""

    exit_code = 130


@dataclass
class RunOptions:
    """Everything ``jacpipe run`` accepts (see ``jacpipe run --help``)."""

    job: str
    params: list[str] = field(default_factory=list)
    out: str | None = None
    shards: int | None = None
    rows_per_shard: int | None = None
    address: str | None = None
    num_cpus: int | None = None
    cpus_per_shard: float = 1.0
    gpus_per_shard: float | None = None
    device: str = "auto"
    dtype: str | None = None
    method: str = "auto"
    memory_budget: str | None = None
    chunk_size: int | None = None
    sparsity: str | None = None
    resume: bool = True
    overwrite: bool = False
    max_in_flight: int | None = None
    progress: bool = True


@dataclass
class RunSummary:
    """What a finished run reports."""

    out: str
    manifest: dict[str, Any]
    computed: int
    skipped: int
    notes: list[str]


def _uri_or_abspath(out: str) -> str:
    import os

    return out if "://" in out else os.path.abspath(out)


# ---------------------------------------------------------------------------
# Preparing the output folder
# ---------------------------------------------------------------------------

OUR_FILES = ("part-", ".part-", ".attempt-", "..attempt-", "._manifest.json", "_manifest.json")


def is_leftover(name: str) -> bool:
    """Whether ``name`` is a temp file or attempt marker of a run, never part of a result.

    ``.part-*.tmp`` (a part being written), ``._manifest.json.*.tmp`` (a
    manifest being rewritten), ``.attempt-*`` markers and their own temp
    files ``..attempt-*.tmp``. A crash at any moment leaves only these, and
    every reader skips them (they start with ``.``).
    """
    return name.startswith((".part-", ".attempt-", "..attempt-", "._manifest.json."))


def _clear(storage: Any) -> None:
    for name in storage.listdir():
        if name.startswith(OUR_FILES):
            storage.delete(name)


def _same_run(old: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """Keys of ``identity`` in which the folder's manifest ``old`` differs.

    The fingerprint is compared with :func:`check_fingerprint`'s tolerance, so
    a resume on a machine whose BLAS rounds the last bits differently is
    still the same run.
    """
    differs = []
    for key, value in identity.items():
        if key == "fingerprint" and isinstance(old.get(key), dict):
            try:
                check_fingerprint(old[key], value)
            except (JacpipeError, KeyError, TypeError, ValueError):
                differs.append(key)
        elif old.get(key) != value:
            differs.append(key)
    return differs


def prepare_output(
    storage: Any, identity: dict[str, Any], *, resume: bool, overwrite: bool
) -> dict[int, dict[str, Any]]:
    """Make ``storage`` ready for the run described by ``identity``.

    Returns:
        Committed shards that can be kept (resume), by index.

    Raises:
        JacpipeError: the folder holds another job's result (without
            ``overwrite``) or unrelated files.
    """
    from pipeline.store import read_manifest

    names = storage.listdir()
    try:
        old = read_manifest(storage) if names else None
    except JacpipeError:
        # A garbage manifest is no commit record: nothing in the folder can be
        # trusted. Only --overwrite may start again there.
        if not overwrite:
            raise
        _clear(storage)
        return {}
    if old is None:
        foreign = [n for n in names if not n.startswith(OUR_FILES)]
        if foreign:
            raise JacpipeError(
                f"--out {storage.display} is not empty and holds no jacpipe result "
                f"({', '.join(foreign[:3])}{'...' if len(foreign) > 3 else ''}); "
                "give an empty or new folder"
            )
        _clear(storage)
        return {}
    differs = _same_run(old, identity)
    if differs:
        if not overwrite:
            what = f"job {old.get('job')!r} with params {json.dumps(old.get('params'))}"
            raise JacpipeError(
                f"--out {storage.display} holds a result of {what} (differs in: "
                f"{', '.join(differs)}); pass --overwrite to replace it or choose another --out"
            )
        _clear(storage)
        return {}
    if not resume:
        _clear(storage)
        return {}
    from pipeline.store import JacobianResult

    result = JacobianResult(storage.uri)
    bad = {p.index for p in result.check(checksums=True)}
    keep = {s["index"]: s for s in result.committed if s["index"] not in bad}
    # Uncommitted or corrupt parts are recomputed (their new file replaces
    # them by rename); leftover temp files and markers of the crashed run go.
    for name in names:
        if is_leftover(name):
            storage.delete(name)
    return keep


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
        raise JacpipeError(f"--num-cpus must be at least 1, got {num_cpus}")
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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
    ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return True


def _shard_task(
    spec: dict[str, Any], pattern: Any = None, coloring: Any = None
) -> dict[str, Any]:
    from pipeline.worker import compute_shard

    return compute_shard(spec, pattern=pattern, coloring=coloring)


_REMOTE: Any = None


def _remote() -> Any:
    """The Ray task: thin wrapper around :func:`pipeline.worker.compute_shard`.

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


def _describe_failure(exc: BaseException, shard: planning.Shard) -> JacpipeError:
    import ray.exceptions as rex

    where = f"shard {shard.index} (rows {shard.start}..{shard.stop})"
    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, JacpipeError):
            return JacpipeError(f"{where}: {cause}", exit_code=cause.exit_code)
        name = type(cause).__name__ if cause is not None else "error"
        msg = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
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


def run(opts: RunOptions, *, echo: Callable[[str], None] = print) -> RunSummary:
    """Run a job end to end (see the module docstring).

    Raises:
        JacpipeError: any user-fixable problem, before anything is scheduled
            where it can be detected early.
        ShardFailedError: the user's function raised in a shard.
        Interrupted: Ctrl-C.
    """
    from pipeline.store import Storage

    t_start = time.perf_counter()
    notes: list[str] = []
    if opts.chunk_size is not None and opts.chunk_size < 1:
        raise JacpipeError(f"--chunk-size must be at least 1, got {opts.chunk_size}")
    if opts.device not in ("auto", "cpu", "cuda"):
        raise JacpipeError(f"--device must be auto, cpu or cuda, got {opts.device!r}")
    builder = resolve_builder(opts.job)
    params = parse_params(builder, opts.params)
    if opts.dtype is not None:
        if opts.dtype not in ("float32", "float64"):
            raise JacpipeError(f"--dtype must be float32 or float64, got {opts.dtype!r}")
        if "dtype" not in job_parameters(builder):
            raise JacpipeError(f"--dtype: job {opts.job!r} has no dtype parameter")
        params["dtype"] = opts.dtype
    problem = build_problem(opts.job, params)
    shapes = validate(problem, opts.job)
    fp = fingerprint(problem, shapes)
    device_param = "device" in job_parameters(builder)
    pattern = _pattern(opts, problem.sparsity, shapes)
    del problem  # the driver holds metadata only (and a sparsity pattern if any)

    out = _uri_or_abspath(opts.out or f"out/{opts.job.replace(':', '_').replace('.', '_')}")
    storage = Storage(out)

    started = connect(opts.address, opts.num_cpus)
    try:
        return _run_connected(
            opts, params, shapes, fp, device_param, storage, notes, t_start, echo,
            pattern=pattern, owns_ray=started,
        )
    finally:
        if started:
            import ray

            ray.shutdown()


def _pattern(opts: RunOptions, job_pattern: Any, shapes: Shapes) -> Any:
    """The sparsity pattern to use: ``--sparsity FILE``, else the job's, else None.

    Raises:
        JacpipeError: ``--method sparse`` without a pattern, or a pattern of the
            wrong shape.
    """
    if opts.method not in ("auto", "sparse"):
        return None
    if opts.sparsity:
        from pipeline.sparse import load_pattern

        pattern = load_pattern(opts.sparsity)
    elif job_pattern is not None:
        from pipeline.coloring import as_pattern

        pattern = as_pattern(job_pattern)
    else:
        if opts.method == "sparse":
            raise JacpipeError(
                f"--method sparse: job {opts.job!r} has no sparsity pattern; give one with "
                "--sparsity FILE (.npz scipy matrix or Parquet with row/col columns)"
            )
        return None
    if pattern.shape != (shapes.m, shapes.n):
        raise JacpipeError(
            f"sparsity pattern has shape {pattern.shape}, expected {(shapes.m, shapes.n)} "
            f"(rows x columns of the {shapes.kind})"
        )
    if shapes.kind == "batched":
        raise JacpipeError("sparsity patterns are supported for jacobian and hessian kinds")
    return pattern


def _pattern_hash(pattern: Any) -> str:
    import hashlib

    import numpy as np

    csr = pattern.tocsr()
    h = hashlib.sha256()
    h.update(np.asarray(csr.shape, dtype=np.int64).tobytes())
    h.update(np.asarray(csr.indptr, dtype=np.int64).tobytes())
    h.update(np.asarray(csr.indices, dtype=np.int64).tobytes())
    return h.hexdigest()


def _cluster_resources() -> tuple[float, float, int, float, float]:
    """``(CPUs, GPUs, smallest node memory, most CPUs on one node, most GPUs on one node)``.

    The per-node maxima matter: a task asking more than any one node has is
    never scheduled (Ray waits forever), whatever the cluster's total.
    """
    import ray

    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    mem = min((int(n["Resources"].get("memory", 0)) for n in nodes), default=0)
    node_cpus = max((float(n["Resources"].get("CPU", 0)) for n in nodes), default=0.0)
    node_gpus = max((float(n["Resources"].get("GPU", 0)) for n in nodes), default=0.0)
    return float(res.get("CPU", 0)), float(res.get("GPU", 0)), mem, node_cpus, node_gpus


def _run_connected(
    opts: RunOptions,
    params: dict[str, Any],
    shapes: Shapes,
    fp: dict[str, Any],
    device_param: bool,
    storage: Any,
    notes: list[str],
    t_start: float,
    echo: Callable[[str], None],
    *,
    pattern: Any = None,
    owns_ray: bool = False,
) -> RunSummary:
    import ray

    from pipeline.store import utcnow, versions, write_manifest

    cpus, gpus, node_memory, node_cpus, node_gpus = _cluster_resources()
    if opts.device == "cuda" and gpus == 0:
        raise JacpipeError(
            "--device cuda: the Ray cluster has no GPUs (cluster resources: "
            f"{cpus:g} CPUs, 0 GPUs); use --device cpu or a cluster with GPUs"
        )
    if opts.device == "cuda" and not device_param:
        raise JacpipeError(
            f"--device cuda: job {opts.job!r} has no `device` parameter, so its problem is "
            "built on the CPU; add `device: str = \"cpu\"` to its build() (see jobs/mlp.py) "
            "or use --device auto/cpu"
        )
    gpus_per_shard = opts.gpus_per_shard
    if gpus_per_shard is None:
        # A job without a `device` parameter builds on the CPU: a GPU would idle.
        gpus_per_shard = 1.0 if gpus > 0 and opts.device != "cpu" and device_param else 0.0
    if not gpus_per_shard >= 0 or gpus_per_shard > max(gpus, 0) and gpus_per_shard > 0:
        raise JacpipeError(
            f"--gpus-per-shard {gpus_per_shard:g}: the cluster has {gpus:g} GPUs"
        )
    if gpus_per_shard > node_gpus:
        raise JacpipeError(
            f"--gpus-per-shard {gpus_per_shard:g}: no node has that many (at most "
            f"{node_gpus:g} GPUs on one node, {gpus:g} in the cluster); a shard runs on one node"
        )
    if gpus_per_shard > 1 and not float(gpus_per_shard).is_integer():
        raise JacpipeError(
            f"--gpus-per-shard {gpus_per_shard:g}: Ray accepts fractions of one GPU "
            "(e.g. 0.5) or whole numbers, not fractions above 1"
        )
    if opts.device == "cuda" and gpus_per_shard == 0:
        raise JacpipeError(
            "--device cuda with --gpus-per-shard 0: a shard computes on a GPU only when "
            "Ray gives it one; give --gpus-per-shard > 0 or leave it out"
        )
    if gpus_per_shard > 0 and not device_param and opts.device != "cpu":
        raise JacpipeError(
            f"--gpus-per-shard {gpus_per_shard:g}: job {opts.job!r} has no `device` "
            "parameter, so its problem is built on the CPU and cannot use a GPU; add "
            "`device: str = \"cpu\"` to its build() (see jobs/mlp.py) or leave "
            "--gpus-per-shard out"
        )
    if not opts.cpus_per_shard > 0 or opts.cpus_per_shard > cpus:
        raise JacpipeError(
            f"--cpus-per-shard {opts.cpus_per_shard:g}: the cluster has {cpus:g} CPUs"
        )
    if opts.cpus_per_shard > node_cpus:
        raise JacpipeError(
            f"--cpus-per-shard {opts.cpus_per_shard:g}: no node has that many (at most "
            f"{node_cpus:g} CPUs on one node, {cpus:g} in the cluster); a shard runs on one node"
        )
    slots = max(1, int(cpus // opts.cpus_per_shard))
    if gpus_per_shard > 0:
        slots = min(slots, max(1, int(gpus // gpus_per_shard)))
    itemsize = 4 if shapes.dtype == "float32" else 8
    budget = (
        planning.parse_size(opts.memory_budget)
        if opts.memory_budget
        else planning.default_memory_budget(node_memory or 8 * 2**30, slots)
    )
    align = shapes.m if shapes.kind == "batched" else 1
    sparse_planned = pattern is not None and opts.method in ("auto", "sparse")
    shards, note = planning.plan_shards(
        shapes.total_rows,
        # NOTE: a sparse shard evaluates fn on all of x once per colour whatever
        # its rows, so more shards than task slots only repeats that work.
        shards=(
            min(slots, shapes.total_rows)
            if sparse_planned and opts.shards is None and opts.rows_per_shard is None
            else opts.shards
        ),
        rows_per_shard=opts.rows_per_shard,
        # A sparse row stores its nonzeros only: (int64 column, value) each.
        row_bytes=(
            shapes.n * itemsize
            if pattern is None or opts.method not in ("auto", "sparse")
            else max(1, int(pattern.nnz) // max(shapes.m, 1)) * (8 + itemsize)
        ),
        workers=slots,
        align=align,
    )
    if note:
        notes.append(note)
        echo(f"note: {note}")
    coloring = None
    if pattern is not None and opts.method in ("auto", "sparse"):
        # NOTE: a known pattern beats both dense modes: one compressed pass per
        # colour instead of one per row (rev) or column (fwd).
        from pipeline.coloring import choose_coloring

        coloring = choose_coloring(pattern, symmetric=shapes.kind == "hessian")
        method, layout = "sparse", "sparse"
        echo(f"sparse: {int(pattern.nnz)} nonzeros, {coloring.num_colors} colours "
             f"({coloring.mode} mode) instead of {min(shapes.m, shapes.n)} dense passes")
    elif shapes.kind == "batched":
        # Every sample's rows sit in (about) one shard: per sample, rev costs m
        # VJPs and fwd n JVPs.
        method = planning.choose_method(opts.method, m=shapes.m, n=shapes.n, shards=1)
        layout = "dense"
    else:
        method = planning.choose_method(opts.method, m=shapes.m, n=shapes.n, shards=len(shards))
        layout = "dense"
    if layout == "sparse":
        group_rows = planning.group_rows(max(1, int(pattern.nnz) // max(shapes.m, 1)), 8 + itemsize)
    else:
        group_rows = planning.group_rows(shapes.n, itemsize)

    identity = {
        "job": opts.job,
        "params": json.loads(json.dumps(params, default=str)),
        "fingerprint": fp,
        "method": method,
        "layout": layout,
        "plan": [[s.start, s.stop] for s in shards],
    }
    if coloring is not None:
        identity["coloring"] = {
            "mode": coloring.mode,
            "num_colors": int(coloring.num_colors),
            "nnz": int(pattern.nnz),
            "pattern_sha256": _pattern_hash(pattern),
        }
    if storage.is_dir():
        keep = prepare_output(storage, identity, resume=opts.resume, overwrite=opts.overwrite)
    else:
        try:
            storage.makedirs()
        except OSError as exc:
            raise JacpipeError(
                f"--out {storage.display}: cannot create the folder ({exc.strerror or exc})"
            ) from None
        keep = {}
    run_id = uuid.uuid4().hex[:12]
    manifest: dict[str, Any] = {
        "format_version": 1,
        **identity,
        "kind": shapes.kind,
        "shapes": shapes.to_json(),
        "dtype": shapes.dtype,
        "options": {
            "memory_budget": budget,
            "cpus_per_shard": opts.cpus_per_shard,
            "gpus_per_shard": gpus_per_shard,
            "device": opts.device,
            "group_rows": group_rows,
        },
        "shards": [keep[i] for i in sorted(keep)],
        "status": "running",
        "run_id": run_id,
        "created": utcnow(),
        "versions": versions(),
    }
    write_manifest(storage, manifest)
    todo = [s for s in shards if s.index not in keep]
    if keep:
        echo(f"resuming: {len(keep)} of {len(shards)} shards already committed")

    meta_common = {
        "format_version": 1,
        "job": opts.job,
        "params": identity["params"],
        "shapes": shapes.to_json(),
        "dtype": shapes.dtype,
        "method": method,
        "fingerprint": fp,
    }
    spec_common = {
        "job": opts.job,
        "params": identity["params"],
        "fingerprint": fp,
        "shapes": shapes.to_json(),
        "out": storage.uri,
        "method": method,
        "memory_budget": budget,
        "threads": max(1, int(math.floor(opts.cpus_per_shard))),
        "device": "cpu" if gpus_per_shard == 0 else opts.device,
        "device_param": device_param,
        "run_id": run_id,
        "chunk_size": opts.chunk_size,
        "group_rows": group_rows,
        "layout": layout,
        "meta": meta_common,
    }
    remote = _remote().options(num_cpus=opts.cpus_per_shard, num_gpus=gpus_per_shard)
    # The pattern and colouring go to the object store once, not once per task.
    sparse_args = () if coloring is None else (ray.put(pattern), ray.put(coloring))
    window = opts.max_in_flight or 2 * slots
    in_flight: dict[Any, planning.Shard] = {}
    pending = list(todo)
    progress = _Progress(len(shards), enabled=opts.progress, echo=echo)
    progress.done_shards = len(keep)
    t_compute = time.perf_counter()
    try:
        with progress:
            while pending or in_flight:
                while pending and len(in_flight) < window:
                    shard = pending.pop(0)
                    spec = dict(spec_common, index=shard.index, start=shard.start, stop=shard.stop)
                    in_flight[remote.remote(spec, *sparse_args)] = shard
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in done:
                    shard = in_flight.pop(ref)
                    try:
                        entry = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - turned into one message
                        raise _describe_failure(exc, shard) from None
                    # One entry per shard, whatever happened before: rows exactly once.
                    manifest["shards"] = [
                        s for s in manifest["shards"] if s["index"] != entry["index"]
                    ]
                    manifest["shards"].append(entry)
                    manifest["shards"].sort(key=lambda s: s["index"])
                    write_manifest(storage, manifest)
                    progress.advance(entry)
    except KeyboardInterrupt:
        # The manifest first: whatever happens next, the folder says what it holds.
        manifest["status"] = "interrupted"
        write_manifest(storage, manifest)
        if not owns_ray:
            _abandon(in_flight)
        raise Interrupted(
            f"interrupted: {len(manifest['shards'])} of {len(shards)} shards committed in "
            f"{storage.display}; rerun the same command to resume"
        ) from None
    except BaseException:
        manifest["status"] = "failed"
        write_manifest(storage, manifest)
        if not owns_ray:
            _abandon(in_flight)
        raise
    manifest["status"] = "complete"
    manifest["wall_seconds"] = round(time.perf_counter() - t_start, 4)
    manifest["compute_seconds"] = round(time.perf_counter() - t_compute, 4)
    manifest["nan"] = sum(int(s.get("nan", 0)) for s in manifest["shards"])
    manifest["inf"] = sum(int(s.get("inf", 0)) for s in manifest["shards"])
    write_manifest(storage, manifest)
    for name in storage.listdir():
        if is_leftover(name):
            storage.delete(name)
    if manifest["nan"] or manifest["inf"]:
        bad = [s["index"] for s in manifest["shards"] if s.get("nan") or s.get("inf")]
        notes.append(
            f"the result holds {manifest['nan']} NaN and {manifest['inf']} Inf values "
            f"(shards {', '.join(map(str, bad[:10]))}{'...' if len(bad) > 10 else ''})"
        )
        echo(f"warning: {notes[-1]}")
    return RunSummary(
        out=storage.uri, manifest=manifest, computed=len(todo), skipped=len(keep), notes=notes
    )


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

    def advance(self, entry: dict[str, Any]) -> None:
        self.done_shards += 1
        self.done_rows += int(entry["rows"])
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
