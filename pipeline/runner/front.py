"""The front door shaped like ``torch.func``: jacobian, hessian, batched_jacobian.

Each call computes with everything a run has (the memory budget's chunks, the
forward/reverse cost model, sparsity and colouring, the adjoint check, the
executor rule: this process or Ray) and *returns* the result:

- a ``torch.Tensor`` shaped like ``torch.func.jacrev``'s (``out_shape +
  in_shape``; Hessian ``in_shape * 2``; batched ``(B,) + out_shape + in_shape``),
  on ``x``'s device, or a ``scipy.sparse.csr_array`` of the flat rows when a
  sparse result is asked for (``sparsity=`` a pattern or ``"auto"``, or
  ``method="sparse"``; NOTE: [The type of the result is the caller's]);
- the result folder opened (:class:`~pipeline.store.reader.JacobianResult`,
  ``.as_linear_operator()`` away) when ``out=`` is given, or when the result
  would not fit the memory budget (a temporary folder is then kept, and a
  warning names it).

NOTE: [Three paths of the front door]
    Without ``out`` and with the result within half the memory budget, small
    work (the executor rule says ``local``) is computed in this process: the
    same row generators and chunk sizes as a shard, no fingerprint (no worker
    checks it), nothing written, sparsity detection only when the dense work
    is worth it. Work the rule sends to Ray (dense) runs as the plan's
    shards, each task returning its rows through Ray's object store (no
    folder; the workers check the fingerprint as for a run). Everything else
    (``out=``, a sparse result on Ray, smoothing, a result too big to hold) is
    an ordinary run into ``out`` or a temporary folder: a rerun with the
    same ``out`` resumes or returns the finished result at once; a temporary
    folder is read back and removed, or kept and returned opened when the
    result is too big. The Ray started by the first call stays up for the
    next (NOTE: [One embedded Ray per process]).

What is differentiable: nothing of the result. It is a plain tensor (or
scipy matrix), detached from ``x`` and from the tensors ``fn`` closes over:
no autograd graph is recorded through it, so ``result.backward()`` or
``torch.func.jacrev(pipeline.jacobian)`` do not work. For a derivative of a
derivative use :func:`hessian` (second derivatives of a scalar),
``torch.func`` nested transforms, or Taylor mode
(``pipeline.taylor``). ``x`` itself needs no ``requires_grad``.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import kind_of, layout_of
from pipeline.core.options import RunOptions
from pipeline.problem.problem import Problem
from pipeline.runner.cluster import cluster_resources, connect, embedded_running, ray_running
from pipeline.runner.driver import log_line, options_from, python_errors, rows_on_ray, run_checked
from pipeline.runner.job import (
    DETECT_MIN_SECONDS,
    CheckedJob,
    PatternChoice,
    check_job,
    refuse_random,
    with_fingerprint,
)
from pipeline.runner.plan import RunPlan, chunk_rows, local_resources, make_plan

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["batched_jacobian", "hessian", "jacobian"]


def jacobian(fn: Callable[[Tensor], Tensor], x: Tensor, *, sparsity: Any = None,
             **options: Any) -> Any:
    """The Jacobian of ``fn`` at ``x``, like ``torch.func.jacrev(fn)(x)``, computed by jacpipe.

    Example::

        J = pipeline.jacobian(lambda t: torch.tanh(w @ t), x)     # (m, n) tensor
        J = pipeline.jacobian(f, x, out="out/J")                  # the folder, opened
        J = pipeline.jacobian(f, x, sparsity="auto")              # scipy CSR

    Args:
        fn: ``R^in_shape -> R^out_shape`` (a function, closure or ``nn.Module``).
        x: the point; its dtype and device are the result's.
        sparsity: a ``scipy.sparse`` pattern, ``"auto"`` (detected) or None.
        **options: ``pipeline.run``'s options (``out``, ``method``, ``memory_budget``,
            ``executor``, ``shards``, ``overwrite``, ``progress``, ...).

    Returns:
        A tensor ``out_shape + in_shape``, a ``scipy.sparse.csr_array`` where
        ``sparsity`` or ``method="sparse"`` asks for a sparse result, or the
        opened folder with ``out=`` or a result beyond the memory budget
        (module docstring).

    Raises:
        JacpipeError: a bad option or function (naming the Python argument),
            ``ShardFailedError`` when ``fn`` raised in a shard.
    """
    return _derive(Problem(fn=fn, x=x, sparsity=sparsity), options, "jacobian")


def hessian(fn: Callable[[Tensor], Tensor], x: Tensor, *, sparsity: Any = None,
            **options: Any) -> Any:
    """The Hessian of a scalar ``fn`` at ``x``, like ``torch.func.hessian(fn)(x)``.

    Args, Returns, Raises: as :func:`jacobian`; the tensor is ``in_shape + in_shape``.
    """
    problem = Problem(fn=fn, x=x, kind="hessian", sparsity=sparsity)
    return _derive(problem, options, "hessian")


def batched_jacobian(fn: Callable[[Tensor], Tensor], xs: Tensor, **options: Any) -> Any:
    """Per-sample Jacobians, like ``torch.func.vmap(torch.func.jacrev(fn))(xs)``.

    Args:
        fn: a function of one sample.
        xs: the samples, ``(B, *in_shape)``.
        **options: as :func:`jacobian`.

    Returns:
        A tensor ``(B, *out_shape, *in_shape)`` (never the ``B²`` cross terms),
        or the opened folder (as :func:`jacobian`).
    """
    return _derive(Problem(fn=fn, x=xs, kind="batched"), options, "batched_jacobian")


def _derive(problem: Problem, options: dict[str, Any], caller: str) -> Any:
    """Check, then compute in memory or through a folder.

    NOTE: [Three paths of the front door] (module docstring); a repeated call
    reuses its first call's plan (NOTE: [Repeated calls of one function]).
    """
    echo = options.pop("echo", None) or log_line
    key = _call_key(problem, options, caller)
    with python_errors():
        recalled = _recall(problem, key)
        if recalled is not None:
            return recalled
        opts, given = options_from(problem, {"progress": False, **options}, caller=caller)
        opts.check()
        if opts.kind is not None:
            raise JacpipeError(f"pipeline.{caller}: kind= is the function's choice here; use "
                               "pipeline.jacobian, hessian or batched_jacobian")
        job = check_job(opts, given, in_process=True)
        dense = not (problem.sparsity is not None or opts.sparsity or opts.method == "sparse")
        if opts.out is None:
            plan = _plan(opts, job)
            fits = _fits(job, plan) and (not dense or 2 * _dense_bytes(job) <= plan.memory_budget)
            if fits and plan.executor == "local":
                out = _first_in_memory(problem, key, job, plan, opts.chunk_size)
                return _dense(out, job) if dense else out
            if fits and plan.coloring is None and opts.smooth is None:
                return _on_ray(opts, with_fingerprint(job), plan, echo)
        return _through_folder(opts, with_fingerprint(job), echo, options, dense=dense)


# NOTE: [The type of the result is the caller's]
#   With no sparsity asked for, method="auto" still detects a pattern where
#   the dense work is worth it (a timed pass decides) and evaluates the
#   colours when they are few: same values, a fraction of the passes. The
#   result is then made dense before it is returned, so that the type of
#   ``pipeline.jacobian(f, x)`` is a tensor whatever the timing, the machine
#   or the function's sparsity (it was a CSR matrix at n = 6,000 and a tensor
#   at n = 2,000 for one stencil). A caller who wants the sparse matrix asks
#   for it (``sparsity=`` a pattern or ``"auto"``, ``method="sparse"``). A
#   dense result beyond half the memory budget comes back as the opened
#   folder, as any result that large does.


def _dense_bytes(job: CheckedJob) -> int:
    s = job.shapes
    return s.total_rows * s.n * s.itemsize


def _dense(out: Any, job: CheckedJob) -> Any:
    """``out`` as the tensor ``jacrev`` gives: a scipy matrix made dense on ``x``'s device
    (NOTE: [The type of the result is the caller's]); anything else as it is."""
    import scipy.sparse as sp

    if not sp.issparse(out):
        return out
    import torch

    x = job.problem.x
    rows = torch.from_numpy(out.toarray()).to(device=x.device, dtype=x.dtype)
    return rows.reshape(job.shapes.full_shape)


# NOTE: [Repeated calls of one function]
#   A Newton loop or an optimiser calls pipeline.jacobian with the same
#   function at a new x of the same shape many times; for a 100 x 100 closure
#   the options, the timed pass, the plan (psutil's memory reading) and the
#   chunk size cost as much as the derivative. A call that took the
#   in-memory path with nothing x-dependent decided (no sparsity detection,
#   no adjoint check, no run-level spot check, no pattern, no smoothing) and
#   whose rows passed the engine's vmap spot check is remembered, weakly
#   keyed by the function object, under its kind, the shape, dtype, layout
#   and device of x, the options given and whether a Ray of the caller's is
#   up. A later call with the same key reuses the plan and chunk size. Every
#   call still checks: fn(x) must give a tensor of the first call's shape
#   and dtype (the key holds x's; else the call is planned, checked and
#   refused as a first call: reverse-mode Jacobian rows read them from the
#   pass that records fn(x) for the rows, other kinds from one more fn(x)),
#   the random-op refusal (cached per function
#   and module training flags in pipeline.sparse.detect), and the engine's
#   forward-mode checks. The vmap spot check (NOTE: [Checks on every engine
#   call]), one unbatched pullback, about a fifth of such a call, runs on
#   every call by default: the spot check is what stands between a wrong
#   batching rule and a silently wrong Jacobian, and a rule may be wrong at
#   some points only. A caller who trusts the rules of a function's ops may
#   space the checks (``checks.checking(every_call=False)`` or
#   ``JACPIPE_CHECK_EVERY_CALL=0``, NOTE: [Spaced checks of repeated
#   evaluations]): remembered calls are then checked on every
#   :data:`SPOT_EVERY`-th call (the 100 x 100 closure: 1.53x ``jacrev``
#   checked every call, 1.22x spaced, on the loaded 2-core machine), and
#
#   - a wrong batching rule that shows at the first call's x is refused on
#     that first call (its rows computed one at a time, a warning), and the
#     function is never remembered: every later call is checked in full;
#   - one that shows only at other points, or after fn's closed-over state
#     changed without changing its output's shape or dtype, is caught on the
#     next checked call (its rows recomputed, a warning, the key forgotten:
#     every call after it is checked); the up to SPOT_EVERY - 1 remembered
#     calls before it return unchecked rows. tests/runner/test_front.py
#     holds both cases, checked every call and spaced.
#   A new function object (a lambda made in the loop) is a new key.

#: Where checks are spaced (``checks.every_call()`` False), a remembered call compares
#: its rows with an unbatched pullback on every ``SPOT_EVERY``-th call only.
#: NOTE: [Repeated calls of one function].
SPOT_EVERY = 8

_REMEMBERED: weakref.WeakKeyDictionary[Any, dict[Hashable, _Remembered]] = (
    weakref.WeakKeyDictionary())
#: Keys remembered per function (the oldest is dropped first).
REMEMBER_PER_FUNCTION = 8


@dataclasses.dataclass
class _Remembered:
    job: CheckedJob  # its problem is None: the call's own is put in
    plan: RunPlan
    chunk: int | None
    output: tuple[Any, ...] | None  # what _output_of gave (fn(x)'s shape and dtype)
    calls: int = 0  # remembered calls so far


def _first_in_memory(problem: Problem, key: Hashable | None, job: CheckedJob, plan: RunPlan,
                     chunk_size: int | None) -> Any:
    """:func:`_in_memory` (``chunk_size``: the caller's, else from the budget), remembered
    for the next call if its rows passed the spot check."""
    from pipeline.maths.engine import spot_rejections

    chunk = chunk_size or _chunk(job, plan)
    rejected = spot_rejections()
    out = _in_memory(job, plan, chunk)
    if spot_rejections() == rejected:
        _remember(problem, key, job, plan, chunk)
    return out


def _call_key(problem: Problem, options: dict[str, Any], caller: str) -> Hashable | None:
    """What a repeated call must share with a remembered one, or None (never remembered)."""
    x = problem.x
    if problem.sparsity is not None or problem.operator or options.get("out") is not None:
        return None
    try:
        key = (caller, problem.kind, tuple(x.shape), x.dtype, x.layout, x.device,
               frozenset(options.items()), bool(options.get("address")) or _on_callers_ray())
        hash(key)
        weakref.ref(problem.fn)
    except (TypeError, AttributeError):  # unhashable options, x not a tensor, fn not weakrefable
        return None
    return key


def _remember(problem: Problem, key: Hashable | None, job: CheckedJob, plan: RunPlan,
              chunk: int | None) -> None:
    """Remember a call whose plan holds at any x (NOTE: [Repeated calls of one function])."""
    if (key is None or job.adjoint is not None or job.spot is not None or job.smoothing
            or job.pattern != PatternChoice() or plan.coloring is not None):
        return
    known = _REMEMBERED.setdefault(problem.fn, {})
    known.pop(key, None)
    while len(known) >= REMEMBER_PER_FUNCTION:
        known.pop(next(iter(known)))
    known[key] = _Remembered(dataclasses.replace(job, problem=None), plan, chunk,
                             _output_of(problem))


def _recall(problem: Problem, key: Hashable | None) -> Any:
    """The result of a remembered call's plan at this ``x``, or None (plan it afresh)."""
    known = _REMEMBERED.get(problem.fn) if key is not None else None
    entry = known.get(key) if known else None
    if entry is None:
        return None
    spec = kind_of(problem.kind)
    plain = not (spec.per_sample or spec.symmetric) and spec.rows_over == "outputs"
    if not plain or entry.plan.method != "rev":
        if _output_of(problem) != entry.output:  # fn(x) changed type, dtype or shape
            known.pop(key, None)
            return None
        return _recalled(problem, key, known, entry)
    # plain reverse-mode rows record fn(x): its shape and dtype are read from that pass
    from pipeline.maths.engine import observed_outputs

    with observed_outputs() as seen:
        try:
            out = _recalled(problem, key, known, entry)
        except Exception:
            if seen[:1] == [entry.output]:
                raise  # the same output: the error is the call's own
            out = None
    if seen[:1] != [entry.output] or out is None:  # changed (or not seen): plan it afresh
        known.pop(key, None)
        return None
    return out


def _recalled(problem: Problem, key: Hashable, known: dict[Hashable, _Remembered],
              entry: _Remembered) -> Any:
    """A remembered call's rows at this ``x``: its plan and chunk, its checks."""
    from pipeline.maths import checks
    from pipeline.maths.engine import spot_check_skipped, spot_rejections

    refuse_random(problem, entry.job.spec)
    entry.calls += 1
    job = dataclasses.replace(entry.job, problem=problem)
    if SPOT_EVERY > 1 and entry.calls % SPOT_EVERY and not checks.every_call():
        with spot_check_skipped():
            return _in_memory(job, entry.plan, entry.chunk)
    rejected = spot_rejections()
    out = _in_memory(job, entry.plan, entry.chunk)
    if spot_rejections() != rejected:  # vmap is wrong here: check every call from now on
        known.pop(key, None)
    return out


def _output_of(problem: Problem) -> tuple[Any, ...] | None:
    """``fn(x)``'s (or one sample's) shape and dtype, None if it is no tensor or raises.

    With the key's kind, shape and dtype of x, the same answer means
    :func:`~pipeline.problem.problem.validate` gives the same shapes (a
    different one: the call is planned, and refused, as a first call).
    """
    import torch

    x = problem.x[0] if kind_of(problem.kind).per_sample else problem.x
    try:
        with torch.no_grad():
            y = problem.fn(x)
    except Exception:  # noqa: BLE001 - the first call's path reports it
        return None
    return (tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else None


def _on_callers_ray() -> bool:
    """Whether a Ray the caller started is up (then it is where shards go, as in ``run``)."""
    return ray_running() and not embedded_running()


def _plan(opts: RunOptions, job: CheckedJob) -> RunPlan:
    """The plan: this machine's resources, or the cluster's (connected now) if one is asked."""
    cluster = bool(opts.address) or _on_callers_ray()
    if opts.address and not ray_running():
        connect(opts.address, opts.num_cpus)
    return make_plan(job.shapes, opts, cluster_resources() if cluster
                     else local_resources(opts.num_cpus), pattern=job.pattern.pattern,
                     pattern_source=job.pattern.source,
                     forward_disagrees=None if job.adjoint is None or job.adjoint.agree
                     else job.adjoint.reason, pass_seconds=None if cluster else job.pass_seconds)


def _on_ray(opts: RunOptions, job: CheckedJob, plan: RunPlan, echo: Callable[[str], None]
            ) -> Any:
    """A dense result computed by Ray tasks, gathered here (no folder), as :func:`_in_memory`."""
    import numpy as np
    import torch

    blocks = rows_on_ray(opts, job, plan, echo)
    rows = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    out = torch.from_numpy(np.ascontiguousarray(rows)).to(job.problem.x.device)
    return out.reshape(job.shapes.full_shape)


def _result_bytes(job: CheckedJob, plan: RunPlan) -> int:
    s = job.shapes
    if plan.coloring is not None:
        return int(plan.pattern.nnz) * (s.itemsize + 8) + 8 * s.total_rows
    return s.total_rows * s.n * s.itemsize


def _fits(job: CheckedJob, plan: RunPlan) -> bool:
    """Whether the whole result takes at most half the memory budget (the rest: the passes)."""
    return 2 * _result_bytes(job, plan) <= plan.memory_budget


#: Bytes a pass may touch per second of measured forward time: bounds the
#: activations of a function too fast to be worth measuring (a 5 us pass
#: cannot hold megabytes per row).
TOUCHED_BYTES_PER_S = 2e10


def _chunk(job: CheckedJob, plan: RunPlan) -> int | None:
    """Rows (``rev``) or columns (``fwd``) per vectorised pass, from the memory budget.

    The activations of a row are bounded from the timed pass for work of a
    few milliseconds, and measured (as a shard does) above that, or where
    the bound alone would split the call into several passes: the bound
    took a 100 x 100 closure's 80 KiB of weights for 1.6 MiB per row and
    computed it in two passes of 80 and 20 rows.
    """
    s = job.shapes
    if job.pass_seconds * s.total_rows / 16 <= DETECT_MIN_SECONDS:
        bound = int(job.pass_seconds / 3 * TOUCHED_BYTES_PER_S / s.itemsize)
        chunk = _chunk_for(job, plan, bound)
        if chunk >= (s.n if plan.method == "fwd" else s.total_rows):
            return chunk
    from pipeline.runner.worker import activation_numel

    return _chunk_for(job, plan, activation_numel(job.problem))


def _chunk_for(job: CheckedJob, plan: RunPlan, activations: int) -> int:
    s = job.shapes
    budget = plan.memory_budget - _result_bytes(job, plan)
    return chunk_rows(budget=budget, baseline=0, m=s.m, n=s.n, activations=activations,
                      itemsize=s.itemsize, group_bytes=0, method=plan.method)


def _in_memory(job: CheckedJob, plan: RunPlan, chunk: int | None) -> Any:
    """The whole result computed here, nothing written: a tensor, or CSR when sparse."""
    import torch

    from pipeline.maths.kinds import iter_rows

    problem, s = job.problem, job.shapes
    if plan.coloring is not None:
        return _sparse_in_memory(problem, plan, chunk)
    out = None
    for first, block in iter_rows(problem, 0, s.total_rows, chunk_size=chunk,
                                  method=plan.method, m=s.m):
        block = block.detach().reshape(len(block), s.n)
        if out is None and first == 0 and len(block) == s.total_rows:
            out = block  # one pass: its rows, no copy (as jacrev)
            continue
        if out is None:
            out = torch.empty(s.total_rows, s.n, dtype=problem.x.dtype, device=problem.x.device)
        out[first:first + len(block)] = block
    if out is None:  # no rows at all
        out = torch.empty(s.total_rows, s.n, dtype=problem.x.dtype, device=problem.x.device)
    return out.reshape(s.full_shape)


def _sparse_in_memory(problem: Problem, plan: RunPlan, chunk: int | None) -> Any:
    import scipy.sparse as sp

    from pipeline.sparse.compressed import evaluate_rows

    rows = evaluate_rows(problem, 0, int(plan.pattern.shape[0]), plan.coloring,
                         chunk_size=chunk, pattern=plan.pattern)
    values = rows.values.detach().cpu().numpy()
    return sp.csr_array((values, rows.cols, rows.indptr), shape=plan.pattern.shape)


def _through_folder(opts: RunOptions, job: CheckedJob, echo: Callable[[str], None],
                    given_options: dict[str, Any], *, dense: bool = False) -> Any:
    """A run into ``out`` (the folder opened), or into a temporary folder read back and removed
    (``dense``: a sparse result made dense, NOTE: [The type of the result is the caller's])."""
    from pipeline.store.reader import open_jacobian

    if opts.out is not None:
        summary = run_checked(opts, job, echo, keep_ray=True)
        return open_jacobian(summary.out)
    if (opts.address or _on_callers_ray()) and not _one_node():
        raise JacpipeError(
            "out: a Ray cluster's workers write the parts where every node can reach them: "
            "give out= a shared folder or an s3:// URI")
    import dataclasses

    tmp = tempfile.mkdtemp(prefix="jacpipe-")
    keep = False
    # Parts read back at once and removed: compressing them only costs time
    # (unless asked for: the folder is kept when the result is too big).
    codec = opts.compression if "compression" in given_options else "none"
    try:
        summary = run_checked(dataclasses.replace(opts, out=tmp, compression=codec), job, echo,
                              keep_ray=True)
        result = open_jacobian(summary.out)
        budget = summary.manifest.options.get("memory_budget") or 0
        held = max(_stored_bytes(result), _dense_bytes(job)) if dense else _stored_bytes(
            result)
        if 2 * held > budget:
            keep = True
            echo(f"warning: the result ({held / 2**20:.0f} MiB) exceeds half "
                 f"the memory budget: kept in {tmp} and returned opened (give out= to choose "
                 "the folder)")
            return result
        out = _read_back(result, job)
        return _dense(out, job) if dense else out
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _stored_bytes(result: Any) -> int:
    s = result.shapes
    if layout_of(result.layout).fixed_width:
        return s.total_rows * s.n * s.itemsize
    return sum(int(e.bytes or 0) for e in result.committed) * 4  # decoded CSR, about


def _read_back(result: Any, job: CheckedJob) -> Any:
    """The folder's rows as the in-memory path returns them (tensor on ``x``'s device, or CSR)."""
    x = job.problem.x
    if not layout_of(result.layout).fixed_width:
        import scipy.sparse as sp

        return sp.csr_array(result.read(as_="scipy", verify=False))
    # verify=False: the parts were written a moment ago by this call (and their
    # footers are still checked against the manifest).
    return result.read(as_="torch", reshape=True, verify=False).to(x.device)


def _one_node() -> bool:
    """Whether the Ray this process is connected to has one node (a local folder reaches it)."""
    try:
        import ray

        return ray.is_initialized() and len([n for n in ray.nodes() if n.get("Alive")]) == 1
    except Exception:  # noqa: BLE001 - unknown: ask for a folder
        return False

