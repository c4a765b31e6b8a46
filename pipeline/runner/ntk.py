"""An eNTK written as a result folder (rows of ``K``), and ``K`` from stored Jacobian rows.

:func:`write_ntk`: each shard is a block of ``x1`` samples, run as a Ray task
(or in this process); it computes its rows ``K[i O + o, :]`` with
:func:`pipeline.maths.ntk.ntk` against all of ``x2``, a few ``x1`` samples at
a time, and streams them into its part, so no process holds ``K`` (the driver
holds none of it). The folder is a dense result like any other: its ``shapes``
are a matrix's (kind ``jacobian``, rows ``N1 O``, columns ``N2 O``) and its
fingerprint's ``ntk`` entry says what the rows are (kernel, path, estimates,
sizes). ``compare`` cannot rebuild it (the model lives in Python, like a run
of an in-memory ``Problem``).

:func:`ntk_from`: ``K = J Jᵀ`` from a stored ``params`` result
(``Problem.from_module``), read block by block, nothing recomputed.

NOTE: [eNTK shards within the memory budget]
    ``memory_budget`` is bytes per process, as for a run. A shard measures its
    process's resident memory when it starts (torch and torch.func set up,
    the inputs counted) and sizes from what is left (``room``): ``x1`` samples
    per written row block so that those rows take at most ``room / 8`` (and
    their copy for Parquet as much); samples per block of the kernel so that
    computing a block's pieces while the other block's are kept takes at most
    ``room / 4`` (per sample: ``O`` cotangents of every intermediate, every
    structured layer's ``a`` and ``g``, the explicit blocks) and a pair of
    blocks' intermediates (a Kronecker layer's ``(b, b, T, O, d_out)``
    product, the ``(b O, b O)`` block) at most ``room / 8``;
    :func:`~pipeline.maths.ntk.ntk` keeps ``room / 8`` of ``x2``'s pieces
    between blocks. A quarter is left to the allocator's slack. Measured on
    the small CNN of ``benchmarks/ntk_scale.py``: 0.8 MB per sample of a
    block, of which ``O`` intermediates' cotangents are 0.53 MB.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import JacpipeError, first_line
from pipeline.core.kinds import kind_of
from pipeline.core.options import parse_size
from pipeline.core.shapes import Shapes
from pipeline.core.shard import ShardResult
from pipeline.maths.engine import intermediate_numel
from pipeline.maths.layers import Network, analyse
from pipeline.maths.ntk import KERNELS, NTK_METHODS, estimate, module_function, ntk
from pipeline.runner.plan import group_rows
from pipeline.store.folder import ResultFolder
from pipeline.store.manifest import Manifest
from pipeline.store.parts import PartWriter, dense_schema, part_name
from pipeline.store.storage import Storage

if TYPE_CHECKING:
    from torch import Tensor

EXECUTORS = ("auto", "local", "ray")

#: ``executor="auto"``: multiply-adds per second of one core on the chosen path
#: (order of magnitude, for the in-process rule only), and the in-process limit
#: (NOTE: [Small jobs in process] in ``runner/plan.py``).
MACS_PER_SECOND = 2e9
LOCAL_MAX_SECONDS = 3.0

#: Room a shard keeps however little the budget leaves
#: (NOTE: [eNTK shards within the memory budget]).
MIN_ROOM = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class NTKShard:
    """One shard of an eNTK folder: the rows of ``x1`` samples ``[a, b)``.

    Args:
        index, a, b: the shard and its samples; out, run_id: where and for which run.
        kernel, method: as :func:`pipeline.ntk` (``method`` already chosen).
        per, n, dtype: rows per sample, columns and dtype of ``K``.
        kept_bytes, sample_bytes, pair_bytes: one sample's pieces on the path,
            what computing them holds, one pair of samples' intermediates (NOTE:
            [eNTK shards within the memory budget]).
        memory_budget: bytes for the process; threads: torch threads (0: leave).
    """

    index: int
    a: int
    b: int
    out: str
    run_id: str
    kernel: str
    method: str
    per: int
    n: int
    dtype: str
    kept_bytes: int
    sample_bytes: int
    pair_bytes: int
    memory_budget: int
    threads: int = 0


def shard_sizes(shard: NTKShard, room: int, n2: int) -> tuple[int, int]:
    """``(x1 samples per written row block, samples per kernel block)`` within ``room`` bytes.

    NOTE: [eNTK shards within the memory budget].
    """
    room = max(room, MIN_ROOM)
    itemsize = _itemsize(shard.dtype)
    rows = max(1, room // (8 * shard.per * shard.n * itemsize))
    block = max(1, min(room // (4 * (shard.kept_bytes + shard.sample_bytes)),
                       math.isqrt(room // (8 * shard.pair_bytes))))
    return min(rows, shard.b - shard.a), min(block, max(rows, n2))


def compute_ntk_shard(model: Any, x1: Tensor, x2: Tensor, shard: NTKShard) -> ShardResult:
    """Rows of ``K`` for ``x1[shard.a:shard.b]`` against all of ``x2``, written as one part.

    ``model`` is a module or its :class:`~pipeline.problem.module.ModuleFunction`.
    A pure function: the Ray task and the in-process executor both call it.
    """
    import torch

    t0 = time.perf_counter()
    if shard.threads:
        torch.set_num_threads(shard.threads)
    model = module_function(model, x1.dtype)
    intermediate_numel(model, x1[0])  # torch.func's one-time setup, before the baseline
    held = x2.element_size() * x2.numel() + x1.element_size() * (shard.b - shard.a) * (
        x1[0].numel() if len(x1) else 0)
    room = shard.memory_budget - _rss() - held  # x1, x2 not yet touched: count them
    rows, block = shard_sizes(shard, room, int(x2.shape[0]))
    options = {"kernel": shard.kernel, "method": shard.method, "block": block,
               "memory_budget": max(room, MIN_ROOM) // 2}  # x2's pieces kept: room / 8
    writer = PartWriter(Storage(shard.out), part_name(shard.index),
                        dense_schema(shard.n, shard.dtype),
                        {"shard": {"index": shard.index, "start": shard.a * shard.per,
                                   "stop": shard.b * shard.per}},
                        group_rows=group_rows(shard.n, _itemsize(shard.dtype)))
    busy = {"compute": 0.0, "write": 0.0}
    try:
        for s0 in range(shard.a, shard.b, rows):
            t = time.perf_counter()
            k = ntk(model, x1[s0:min(s0 + rows, shard.b)], x2, **options).detach().cpu().numpy()
            busy["compute"] += time.perf_counter() - t
            t = time.perf_counter()
            writer.write(s0 * shard.per, k)
            busy["write"] += time.perf_counter() - t
            del k
        info = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return ShardResult(shard.index, shard.a * shard.per, shard.b * shard.per, info.file,
                       info.rows, info.checksum, info.bytes, nan=info.nan, inf=info.inf,
                       seconds=round(time.perf_counter() - t0, 4),
                       compute_seconds=round(busy["compute"], 4),
                       write_seconds=round(busy["write"], 4), device="cpu",
                       chunk_size=block, peak_rss=_peak_rss(), pid=os.getpid(),
                       run_id=shard.run_id)


def _itemsize(dtype: str) -> int:
    import numpy as np

    return int(np.dtype(dtype).itemsize)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _choose(fn: Any, x1: Tensor, n2: int, kernel: str, method: str
            ) -> tuple[str, dict[str, float], dict[str, str], Network]:
    """The path (as :func:`~pipeline.maths.ntk.ntk` picks it, shards never symmetric)."""
    if kernel not in KERNELS or method not in NTK_METHODS:
        raise JacpipeError(f"ntk: kernel must be one of {KERNELS} and method one of "
                           f"{NTK_METHODS}, got kernel={kernel!r}, method={method!r}")
    net = analyse(fn, x1[0])
    ob = 1 if kernel == "sum" else net.outputs
    net = Network(net.layers, net.rest, ob, net.flops)
    estimates, ways = estimate(net, fn.numel, int(x1.shape[0]), n2, trace=kernel == "trace",
                               symmetric=False)
    chosen = min(estimates, key=estimates.__getitem__) if method == "auto" else method
    return chosen, estimates, ways if chosen == "structured" else {}, net


def _memory_facts(net: Network, method: str, ways: dict[str, str], p: int, inter: int,
                  kernel: str, itemsize: int) -> tuple[int, int, int]:
    """Bytes on the path: ``(a sample's pieces kept, computing them, a pair's intermediates)``.

    Computing a block's pieces carries ``O`` cotangents of every intermediate
    (``inter`` elements: :func:`~pipeline.maths.engine.intermediate_numel`)
    per sample, and every structured layer's ``a`` and ``g`` before a layer
    whose way is ``explicit`` forms its ``O x d_out d_in`` block from them (NOTE:
    [eNTK shards within the memory budget]).
    """
    o = net.outputs
    square = 1 if kernel != "full" else o * o
    if method != "structured":
        kept = o * p
        vectors = o * p if method == "ntk-vp" else 0  # one VJP's P-vector per output
        return kept * itemsize, (o * inter + 2 * kept) * itemsize, (
            2 * square + vectors) * itemsize
    kept, factors, pair, covered = 0, 0, 2 * square, 0
    for layer in net.layers:
        t = layer.positions
        factors += t * (layer.d_in + o * layer.d_out)
        if ways[layer.name] == "kron":
            kept += t * (layer.d_in + o * layer.d_out)
            pair = max(pair, 2 * square + t * t + 2 * t * o * layer.d_out)
        else:
            kept += o * layer.numel
        covered += layer.numel
    kept += o * (p - covered)
    return kept * itemsize, (o * inter + factors + kept) * itemsize, pair * itemsize


def _cpus(num_cpus: int | None) -> int:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, num_cpus or len(os.sched_getaffinity(0)))


def _executor(asked: str, estimates: dict[str, float], method: str, x1: Tensor) -> str:
    """``local`` or ``ray``: ``auto`` keeps seconds of work (or a GPU's inputs) here."""
    from pipeline.runner.cluster import ray_running

    if asked not in EXECUTORS:
        raise JacpipeError(f"write_ntk: executor must be one of {EXECUTORS}, got {asked!r}")
    if asked == "ray" and x1.device.type != "cpu":
        raise JacpipeError("write_ntk: executor='ray' computes on the workers' CPUs; pass "
                           "CPU inputs and model, or executor='local' for the GPU")
    if asked != "auto":
        return asked
    if x1.device.type != "cpu":
        return "local"
    small = estimates[method] / MACS_PER_SECOND < LOCAL_MAX_SECONDS
    return "local" if small and not ray_running() else "ray"


def write_ntk(model: Any, x1: Tensor, x2: Tensor | None = None, *, out: str,
              kernel: str = "full", method: str = "auto", samples_per_shard: int | None = None,
              memory_budget: int | str = 1 << 30, executor: str = "auto",
              num_cpus: int | None = None, overwrite: bool = False) -> Manifest:
    """Compute the eNTK of ``model`` block by block and write its rows to ``out``.

    Args:
        model, x1, x2, kernel, method: as :func:`pipeline.ntk`.
        out: the result folder (local path or ``s3://`` URI; on a Ray cluster of
            several nodes, one every node reaches).
        samples_per_shard: ``x1`` samples per shard (rows ``samples * O``, or
            ``samples`` for the trace and sum kernels); None: two shards per CPU.
        memory_budget: bytes per process (``"1GiB"`` or an int): the shards
            size their blocks from it (NOTE: [eNTK shards within the memory budget]).
        executor: ``ray`` (a task per shard; an embedded Ray is started if none
            runs), ``local`` (this process) or ``auto`` (``local`` for a few
            seconds of work when no Ray runs, or for inputs on a GPU).
        num_cpus: CPUs of an embedded Ray (default: this machine's).
        overwrite: replace an existing result in ``out``.

    Each shard computes its rows against all of ``x2`` (a symmetric kernel's
    half-of-the-blocks saving is not taken across shards); the path is chosen
    once for the whole kernel, by the cost estimate at the full sizes, and
    recorded in the fingerprint with the executor. Each shard's peak resident
    memory and process id are in its manifest entry (``peak_rss``, ``pid``).

    Returns:
        The written :class:`~pipeline.store.manifest.Manifest`.

    Raises:
        JacpipeError: ``out`` holds another result and ``overwrite`` is off, a
            bad option, a shard that failed, or what :func:`pipeline.ntk` raises.
    """
    t0 = time.perf_counter()
    budget = parse_size(memory_budget) if isinstance(memory_budget, str) else int(memory_budget)
    fn = module_function(model, x1.dtype)
    y = x1 if x2 is None else x2
    n1, n2 = int(x1.shape[0]), int(y.shape[0])
    chosen, estimates, ways, net = _choose(fn, x1, n2, kernel, method)
    where = _executor(executor, estimates, chosen, x1)
    cpus = _cpus(num_cpus) if where == "ray" else 1
    step = samples_per_shard or max(1, -(-n1 // (2 * cpus)))
    if step < 1:
        raise JacpipeError(f"write_ntk: samples_per_shard must be >= 1, got {step}")
    per = net.outputs if kernel == "full" else 1
    dtype = str(fn.flat.dtype).removeprefix("torch.")
    sizes = _memory_facts(net, chosen, ways, fn.numel, intermediate_numel(fn, x1[0]), kernel,
                          fn.flat.element_size())
    plan = [(a * per, min(a + step, n1) * per) for a in range(0, n1, step)]
    facts = {"kernel": kernel, "method": chosen, "estimates": estimates, "layers": ways,
             "n1": n1, "n2": n2, "rows_per_sample": per, "symmetric": x2 is None,
             "executor": where}
    manifest = _manifest(facts, plan, n2 * per, dtype, budget)
    threads = max(1, cpus // min(cpus, len(plan))) if where == "ray" else 0
    shards = [NTKShard(i, a // per, b // per, out, manifest.run_id, kernel, chosen, per,
                       n2 * per, dtype, *sizes, budget, threads)
              for i, (a, b) in enumerate(plan)]
    folder = ResultFolder(Storage(out))
    folder.prepare(manifest, resume=False, overwrite=overwrite)
    try:
        if where == "ray":
            _on_ray(fn, x1, x2, shards, folder, num_cpus)
        else:
            for shard in shards:
                folder.commit(compute_ntk_shard(fn, x1, y, shard))
    except BaseException:
        folder.finish("failed")
        raise
    folder.finish("complete", wall_seconds=round(time.perf_counter() - t0, 3))
    assert folder.manifest is not None
    return folder.manifest


def _manifest(facts: dict[str, Any], plan: list[tuple[int, int]], n: int, dtype: str,
              budget: int, parameters: dict[str, Any] | None = None) -> Manifest:
    """The manifest of a kernel's folder: a dense matrix of ``plan[-1][1]`` rows of ``n``."""
    fingerprint = {"ntk": facts, **({"parameters": parameters} if parameters else {})}
    return Manifest(job="python:ntk", params={}, fingerprint=fingerprint,
                    method=facts["method"], layout="dense", plan=plan,
                    shapes=Shapes("jacobian", (n,), (plan[-1][1],), None, dtype),
                    run_id=uuid.uuid4().hex[:12], options={"memory_budget": budget})


def _ray_shard(model: Any, x1: Any, x2: Any, shard: NTKShard) -> ShardResult:
    """The Ray task: the inputs arrive as NumPy arrays from the object store (not copied)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # read-only shared memory: never written to
        warnings.simplefilter("ignore", UserWarning)
        t1, t2 = torch.from_numpy(x1), torch.from_numpy(x2 if x2 is not None else x1)
    return compute_ntk_shard(model, t1, t2, shard)


def _on_ray(fn: Any, x1: Tensor, x2: Tensor | None, shards: list[NTKShard],
            folder: ResultFolder, num_cpus: int | None) -> None:
    """Every shard as a Ray task (the inputs put in the object store once), committed as done."""
    import ray

    from pipeline.runner.cluster import ray_running, start_embedded

    if not ray_running():
        start_embedded(num_cpus)
    shared = [ray.put(fn)] + [ray.put(None if x is None else x.detach().numpy())
                              for x in (x1, x2)]
    task = ray.remote(max_retries=0)(_ray_shard)
    pending = {task.options(num_cpus=max(1, s.threads)).remote(*shared, s): s for s in shards}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            shard = pending.pop(done[0])
            try:
                folder.commit(ray.get(done[0]))
            except ray.exceptions.RayTaskError as exc:
                raise JacpipeError(f"write_ntk: shard {shard.index} (samples {shard.a}.."
                                   f"{shard.b - 1}) failed: {first_line(exc.cause or exc)}"
                                   ) from None
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def ntk_from(jacobian: Any, jacobian2: Any = None, *, model: Any = None, kernel: str = "full",
             memory_budget: int | str = 1 << 30, out: str | None = None,
             overwrite: bool = False) -> Any:
    """The eNTK from stored parameter Jacobians: ``K = J1 J2ᵀ``, block by block, nothing recomputed.

    The ``torch.func`` tutorial's ``empirical_ntk_jacobian_contraction`` with
    its ``jac1``, ``jac2`` read from result folders of kind ``params``
    (``pipeline.run(Problem.from_module(model, x), out=...)``), a block of
    samples at a time.

    Example::

        pipeline.run(Problem.from_module(net, x), out="out/J")
        K = pipeline.ntk_from("out/J", model=net)              # == pipeline.ntk(net, x)

    Args:
        jacobian: the ``x1`` samples' Jacobians: a folder (path or URI) or an
            opened :class:`~pipeline.store.reader.JacobianResult`.
        jacobian2: the ``x2`` samples' (same parameters); None: ``jacobian``
            (symmetric: half the blocks, unless ``out`` is given).
        model: when given, the stored parameters' hash (the fingerprint's
            ``parameters``) must be this model's.
        kernel: ``full``, ``trace`` or ``sum``, as :func:`pipeline.ntk`.
        memory_budget: bytes (or ``"1GiB"``) for this process: of what it has
            left (less ``K`` when returned), a block of Jacobians takes at most
            an eighth (two are held, each read through Arrow) and a block of
            rows of ``K`` an eighth.
        out: write the rows of ``K`` to this folder (one part per block of
            ``x1`` samples) instead of returning them.
        overwrite: replace an existing result in ``out``.

    Returns:
        ``K`` as a tensor (:func:`pipeline.ntk`'s shape, the stored dtype), or the
        written :class:`~pipeline.store.manifest.Manifest` with ``out``.

    Raises:
        JacpipeError: a folder that is not a complete, intact ``params`` result,
            two results of other parameters, a ``model`` whose parameters are
            not the stored ones, or an unknown kernel.
    """
    budget = parse_size(memory_budget) if isinstance(memory_budget, str) else int(memory_budget)
    if kernel not in KERNELS:
        raise JacpipeError(f"ntk_from: kernel must be one of {KERNELS}, got {kernel!r}")
    r1 = _params_result(jacobian, "jacobian")
    r2 = r1 if jacobian2 is None else _params_result(jacobian2, "jacobian2")
    stored = _same_parameters(r1, r2, model)
    s1, s2 = r1.shapes, r2.shapes
    per = s1.m if kernel == "full" else 1
    n1, n2 = int(s1.batch or 1), int(s2.batch or 1)
    # NOTE: [eNTK shards within the memory budget]: a block of Jacobians is read
    # through Arrow (two copies, and the row groups decoded ahead), two are held,
    # and a block of rows of K written.
    result = 0 if out is not None else n1 * per * n2 * per * s1.itemsize
    room = max(budget - _rss() - result - _reading_bytes(s1.n, s1.itemsize), MIN_ROOM)
    block = max(1, room // (8 * s1.m * s1.n * s1.itemsize))
    rows = max(1, min(block, n1, room // (8 * per * n2 * per * s1.itemsize)))
    # a row group is decoded whole: blocks of x2 samples at least its size (within
    # the reading's share) read each group about once per pass over x2
    block = max(block, group_rows(s1.n, s1.itemsize) // s1.m)
    symmetric = jacobian2 is None and out is None
    if out is not None:
        return _write_from(r1, r2, kernel, (rows, min(block, n2)), out, budget, stored,
                           overwrite)
    import torch

    step = min(rows, block) if symmetric else rows  # equal steps: the upper blocks
    k = torch.empty(n1 * per, n2 * per, dtype=getattr(torch, s1.dtype))
    for a1, a2, part in _stored_blocks(r1, r2, kernel, (step, step if symmetric else block),
                                       upper=symmetric):
        k[a1 * per:a1 * per + part.shape[0], a2 * per:a2 * per + part.shape[1]] = part
        if symmetric and a2 > a1:
            k[a2 * per:a2 * per + part.shape[1], a1 * per:a1 * per + part.shape[0]] = part.T
    return k


def _reading_bytes(n: int, itemsize: int) -> int:
    """What reading rows holds besides them: the row groups decoded ahead, twice (Arrow, NumPy)."""
    from pipeline.store.reader import READ_THREADS

    return 2 * (READ_THREADS + 1) * group_rows(n, itemsize) * n * itemsize


def _params_result(source: Any, arg: str) -> Any:
    """``source`` opened: a complete, intact result of kind ``params``, or one clear error."""
    from pipeline.store.reader import JacobianResult, open_jacobian

    res = source if isinstance(source, JacobianResult) else open_jacobian(source)
    where = res.storage.display
    if kind_of(res.shapes.kind).columns_over != "parameters":
        raise JacpipeError(
            f"ntk_from: {arg} {where!r} holds a {res.shapes.kind!r} result; expected parameter "
            "Jacobians: pipeline.run(Problem.from_module(model, x), out=...)")
    problems = res.check()
    if problems:
        raise JacpipeError(f"ntk_from: {arg} {where!r} is incomplete or damaged: {problems[0]} "
                           f"({len(problems)} shard(s)); finish or rerun the run first")
    return res


def _same_parameters(r1: Any, r2: Any, model: Any) -> dict[str, Any]:
    """The stored parameters' facts, the same in both results and, if given, ``model``'s."""
    f1 = r1.manifest.fingerprint.get("parameters") or {}
    f2 = r2.manifest.fingerprint.get("parameters") or {}
    if (f1.get("sha256"), f1.get("layout")) != (f2.get("sha256"), f2.get("layout")):
        raise JacpipeError(
            f"ntk_from: {r1.storage.display!r} and {r2.storage.display!r} hold Jacobians of "
            f"other parameters (sha256 {str(f1.get('sha256'))[:12]} and "
            f"{str(f2.get('sha256'))[:12]}); compute both with the same model")
    if model is not None:
        now = module_function(model, None).facts()
        if (now["sha256"], now["layout"]) != (f1.get("sha256"), f1.get("layout")):
            raise JacpipeError(
                f"ntk_from: {r1.storage.display!r} holds the Jacobians of other parameters than "
                f"the model's (stored sha256 {str(f1.get('sha256'))[:12]}, the model's "
                f"{now['sha256'][:12]}): pass the model they were computed with, or recompute "
                "them with pipeline.run(Problem.from_module(model, x), out=...)")
    return f1


def _samples(res: Any, a: int, b: int) -> Tensor:
    """Samples ``[a, b)`` of a ``params`` result: ``(b - a, O, P)`` (checksums verified once)."""
    import torch

    s = res.shapes
    rows = res.read(rows=slice(a * s.m, b * s.m))
    return torch.from_numpy(rows).reshape(b - a, s.m, s.n)


def _contract(j1: Tensor, j2: Tensor, kernel: str) -> Tensor:
    """One block of ``K`` from two blocks of ``(b, O, P)`` Jacobians (the tutorial's einsums)."""
    import torch

    if kernel == "trace":
        return torch.einsum("iop,jop->ij", j1, j2)
    if kernel == "sum":
        return j1.sum(1) @ j2.sum(1).T
    return j1.reshape(-1, j1.shape[2]) @ j2.reshape(-1, j2.shape[2]).T


def _stored_blocks(r1: Any, r2: Any, kernel: str, steps: tuple[int, int], *, upper: bool
                   ) -> Any:
    """Yield ``(a1, a2, block)``: the block of ``K`` of samples ``a1..``, ``a2..``.

    ``upper``: only blocks with ``a2 >= a1`` (a symmetric kernel; equal steps).
    """
    import pyarrow as pa

    n1, n2 = int(r1.shapes.batch or 1), int(r2.shapes.batch or 1)
    for a1 in range(0, n1, steps[0]):
        j1 = _samples(r1, a1, min(a1 + steps[0], n1))
        for a2 in range(a1 if upper else 0, n2, steps[1]):
            same = upper and a2 == a1
            j2 = j1 if same else _samples(r2, a2, min(a2 + steps[1], n2))
            yield a1, a2, _contract(j1, j2, kernel)
            del j2
            pa.default_memory_pool().release_unused()  # Arrow keeps decoded groups' pages


def _write_from(r1: Any, r2: Any, kernel: str, steps: tuple[int, int], out: str,
                budget: int, stored: dict[str, Any], overwrite: bool) -> Manifest:
    """:func:`ntk_from` into a folder: a part per block of ``x1`` samples' rows."""
    import torch

    t0 = time.perf_counter()
    s1 = r1.shapes
    per = s1.m if kernel == "full" else 1
    n1, n2 = int(s1.batch or 1), int(r2.shapes.batch or 1)
    plan = [(a * per, min(a + steps[0], n1) * per) for a in range(0, n1, steps[0])]
    facts = {"kernel": kernel, "method": "stored", "n1": n1, "n2": n2, "rows_per_sample": per,
             "symmetric": r1 is r2, "from": [r1.storage.display, r2.storage.display]}
    manifest = _manifest(facts, plan, n2 * per, s1.dtype, budget, stored)
    storage = Storage(out)
    folder = ResultFolder(storage)
    folder.prepare(manifest, resume=False, overwrite=overwrite)
    rows: Any = None
    try:
        for a1, a2, part in _stored_blocks(r1, r2, kernel, steps, upper=False):
            if a2 == 0:
                t_block = time.perf_counter()
                rows = torch.empty(part.shape[0], n2 * per, dtype=part.dtype)
            rows[:, a2 * per:a2 * per + part.shape[1]] = part
            if a2 * per + part.shape[1] == n2 * per:
                index = a1 // steps[0]
                folder.commit(_part(storage, manifest.run_id, index, a1 * per, rows, t_block))
    except BaseException:
        folder.finish("failed")
        raise
    folder.finish("complete", wall_seconds=round(time.perf_counter() - t0, 3))
    assert folder.manifest is not None
    return folder.manifest


def _part(storage: Storage, run_id: str, index: int, a: int, block: Any, t0: float
          ) -> ShardResult:
    """Rows ``[a, a + len(block))`` of ``K`` as one committed part (``t0``: its start)."""
    rows = block.detach().cpu().numpy()
    writer = PartWriter(storage, part_name(index),
                        dense_schema(rows.shape[1], str(rows.dtype)),
                        {"shard": {"index": index, "start": a, "stop": a + len(rows)}},
                        group_rows=group_rows(rows.shape[1], rows.itemsize))
    try:
        writer.write(a, rows)
        info = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return ShardResult(index, a, a + len(rows), info.file, info.rows, info.checksum,
                       info.bytes, nan=info.nan, inf=info.inf,
                       seconds=round(time.perf_counter() - t0, 4), run_id=run_id,
                       peak_rss=_peak_rss(), pid=os.getpid())
