"""Automatic sparsity detection: the Jacobian (or Hessian) pattern of a torch function.

``fn`` is traced once to ATen ops (``make_fx`` over ``functionalize``, so
in-place writes arrive as ``slice_scatter``/``index_put``..., with the ATen
decompositions for ops that have no rule of their own), then the graph is
walked once while every tensor carries its dependency pattern on
``x.reshape(-1)`` as a boolean ``scipy.sparse`` matrix; constants (weights,
index tensors, masks) are computed for real and read as data, on the CPU.
The rules, one per op family, live in :mod:`pipeline.sparse.rules`. With a
density cap, a few reverse-mode rows of J at x are looked at first (NOTE:
[dense probe]), so a dense problem is given up in a few forward passes
(after the propagation, and only where needed, for a graph of cheap ops:
NOTE: [probe only where propagation is not cheaper]).

Two modes:

- ``"global"``: the pattern is a superset of the Jacobian's nonzeros at *any*
  ``x`` (constant operands such as stencil weights or index tensors are read as
  data; anything computed from ``x`` is not). Data-dependent control flow
  (``.item()``, ``if tensor:``) is refused.
- ``"local"``: the branches taken at this ``x`` are followed and values
  computed from ``x`` may be read as data; the pattern holds at ``x`` only.

A Hessian's pattern is the Jacobian pattern of ``torch.func.grad(fn)``, traced
the same way, so linear terms drop out.

The planner's use::

    report = problem_sparsity(problem)          # mode="global", default cap
    if report.dense:                            # colouring would be pointless
        ...                                     # the dense path
    else:
        coloring = choose_coloring(report.pattern, symmetric=kind_of(problem.kind).symmetric)
        ...                                     # pipeline.sparse.compressed with report.pattern

``SparsityError`` (a ``ValueError``) says why detection refused (random ops,
control flow on x: suggests ``mode="local"``); ``report.warnings`` lists the
ops handled conservatively (also raised once each as ``SparsityWarning``).
"""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.core.errors import first_line
from pipeline.core.kinds import kind_of
from pipeline.sparse import rules
from pipeline.sparse.randomness import refuse_random_ops as refuse_random_ops
from pipeline.sparse.rules import (
    CONST,
    Context,
    Dense,
    Dep,
    Op,
    SparsityError,
    SparsityWarning,
    active,
    constant,
    draws_random,
    fallback,
    is_random,
    op_name,
    rule_for,
)

if TYPE_CHECKING:
    from pipeline.problem.problem import Problem

__all__ = ["SparsityError", "SparsityReport", "SparsityWarning", "detect_sparsity",
           "problem_sparsity", "refuse_random_ops", "trace_sparsity"]

KINDS = ("jacobian", "hessian")
MODES = ("global", "local")
DEFAULT_MAX_DENSITY = 0.25
DEFAULT_MAX_BYTES = 2**29  # 512 MiB of column indices in one tensor's pattern
_PROBE_ROWS = 2  # NOTE: [dense probe]
# Ops whose result is a Python value or a data-dependent shape: fine on constants,
# control flow on x when fed a tensor computed from x.
_DATA_DEPENDENT_ERRORS = ("_local_scalar_dense", "DataDependent", "data-dependent",
                          "data dependent", "DynamicOutputShape", "Could not guard",
                          "GuardOnDataDependent", "is_nonzero", "item()")
_DATA_DEPENDENT = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "argwhere",
                   "unique", "_unique2", "unique_consecutive", "unique_dim")


@dataclass(frozen=True)
class SparsityReport:
    """What :func:`trace_sparsity` found.

    Args:
        pattern: boolean CSR ``(m, n)`` pattern (``(n, n)`` for a Hessian), or
            None when ``dense``.
        dense: detection gave up because a tensor's pattern exceeded the
            density/byte cap: colouring would be pointless, use the dense path.
        seconds: wall time of the detection.
        reason: one line: what was detected, or why it gave up.
        mode: ``"global"`` (holds at any x) or ``"local"`` (holds at this x).
        warnings: ops handled conservatively, and (local mode) the
            data-dependent steps followed at this x.
    """

    pattern: sp.csr_matrix | None
    dense: bool
    seconds: float
    reason: str
    mode: str
    warnings: tuple[str, ...] = ()


def problem_sparsity(
    problem: Problem,
    *,
    mode: str = "global",
    max_density: float | None = DEFAULT_MAX_DENSITY,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> SparsityReport:
    """:func:`trace_sparsity` for a :class:`~pipeline.problem.problem.Problem` (the planner's call).

    Args:
        problem: a Problem (``fn``, ``x``, ``kind``). ``"jacobian"`` and
            ``"hessian"`` problems are traced as they are; for ``"batched"``
            the per-sample Jacobian of ``fn`` at the first sample ``x[0]``
            (every sample shares it in global mode).
        mode: ``"global"`` or ``"local"``.
        max_density: see :func:`trace_sparsity`.
        max_bytes: see :func:`trace_sparsity`.

    Returns:
        A :class:`SparsityReport`.

    Raises:
        SparsityError: as :func:`trace_sparsity`; an empty batch.
    """
    kind, x = problem.kind, problem.x
    if kind_of(kind).per_sample:
        if x.shape[0] == 0:
            raise SparsityError("a batched problem with no samples has no pattern to detect")
        kind, x = "jacobian", x[0]
    return trace_sparsity(problem.fn, x, kind=kind, mode=mode, max_density=max_density,
                          max_bytes=max_bytes)


def detect_sparsity(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    kind: str = "jacobian",
    mode: str = "global",
    max_density: float | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> sp.csr_matrix:
    """The sparsity pattern of the Jacobian (or Hessian) of ``fn`` at ``x``.

    Args:
        fn: ``R^x.shape -> R^out_shape``; rows index ``fn(x).reshape(-1)``.
        x: the point; columns index ``x.reshape(-1)``.
        kind: ``"jacobian"`` or ``"hessian"`` (``fn`` scalar).
        mode: ``"global"`` (valid at any x) or ``"local"`` (at this x only).
        max_density: give up once a tensor's pattern is denser than this
            (None: no density cap).
        max_bytes: give up once a tensor's pattern would need more bytes.

    Returns:
        Boolean ``scipy.sparse.csr_matrix``, ``(m, n)`` or ``(n, n)``.

    Raises:
        SparsityError: random ops; data-dependent control flow in global
            mode; a non-scalar ``fn`` for a Hessian; the cap was hit (the
            message says which tensor).
    """
    report = trace_sparsity(fn, x, kind=kind, mode=mode, max_density=max_density,
                            max_bytes=max_bytes)
    if report.dense:
        raise SparsityError(
            f"sparsity detection gave up: {report.reason}. The Jacobian is (nearly) dense; "
            "use the dense path, or raise max_density/max_bytes")
    assert report.pattern is not None
    return report.pattern


def trace_sparsity(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    kind: str = "jacobian",
    mode: str = "global",
    max_density: float | None = DEFAULT_MAX_DENSITY,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> SparsityReport:
    """Detect the pattern, or report that it is too dense to be worth colouring.

    The planner's entry: with the default cap a dense problem (an MLP) costs
    a few forward passes before ``dense=True`` comes back (NOTE: [dense
    probe]); a sparse one is traced once and its patterns propagated.

    Args:
        fn: the function (see :func:`detect_sparsity`).
        x: the point.
        kind: ``"jacobian"`` or ``"hessian"``.
        mode: ``"global"`` or ``"local"``.
        max_density: largest ``nnz / (rows * n)`` of any tensor's pattern
            (beyond ``2 (m + n)`` entries) before giving up; None: no cap.
        max_bytes: largest pattern of any tensor, in bytes of column indices
            (8 per entry); None: no cap.

    Returns:
        A :class:`SparsityReport`.

    Raises:
        SparsityError: a bad ``kind``/``mode``, random ops, data-dependent
            control flow on x in global mode, a non-scalar Hessian ``fn``, or
            ``fn`` could not be traced.
    """
    began = time.perf_counter()
    if kind not in KINDS:
        raise SparsityError(f"kind must be one of {KINDS}, got {kind!r} (for a 'batched' "
                            "problem detect one sample's Jacobian with kind='jacobian')")
    if mode not in MODES:
        raise SparsityError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise SparsityError(f"x must be a floating-point tensor, got {type(x).__name__}"
                            + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    xd = x.detach()
    pending = bool(kind_of(kind).plain and max_density is not None and _PROBE_ROWS)
    gm = None
    if pending:  # NOTE: [probe only where propagation is not cheaper]
        gm = _record(fn, xd, mode)
        if gm is None or not _cheap_to_propagate(gm):
            reason = _dense_probe(fn, xd, max_density, max_bytes)
            if reason is not None:
                return SparsityReport(None, True, time.perf_counter() - began, reason, mode)
            pending = False
    try:
        report = _detect(fn, xd, gm, kind, mode, max_density, max_bytes, began)
    except SparsityError:
        if pending and (reason := _dense_probe(fn, xd, max_density, max_bytes)) is not None:
            return SparsityReport(None, True, time.perf_counter() - began, reason, mode)
        raise
    if pending and (report.dense or _probe_may_say_dense(report.pattern, max_density)):
        reason = _dense_probe(fn, xd, max_density, max_bytes)
        if reason is not None:
            return SparsityReport(None, True, time.perf_counter() - began, reason, mode)
    return report


def _detect(fn: Callable, xd: torch.Tensor, gm: torch.fx.GraphModule | None, kind: str,
            mode: str, max_density: float | None, max_bytes: int | None, began: float
            ) -> SparsityReport:
    """Trace (unless ``gm`` is the trace already), refuse what cannot be followed, propagate."""
    n = xd.numel()
    if gm is None:
        gm = _trace(_target(fn, kind), xd, mode)
    _refuse_random(gm)
    _refuse_unfunctionalized(gm)
    if mode == "global":
        # The forward part of a Hessian's trace is dead code once grad is
        # taken (its scalar output is unused): no need to propagate it.
        gm.graph.eliminate_dead_code()
    out = next(iter(node for node in gm.graph.nodes if node.op == "output")).args[0]
    val = getattr(out, "meta", {}).get("val") if isinstance(out, torch.fx.Node) else None
    m = n if kind_of(kind).symmetric else (val.numel() if isinstance(val, torch.Tensor) else n)
    ctx = Context(n, m, mode, max_density, max_bytes)
    try:
        with active(ctx):
            dep = _propagate(gm, xd, ctx)
    except Dense as exc:
        return SparsityReport(None, True, time.perf_counter() - began, str(exc), mode,
                              tuple(ctx.warnings))
    if dep.pattern is None:
        pattern = sp.csr_matrix((m, n), dtype=bool)
    else:
        pattern = sp.csr_matrix(dep.pattern, dtype=bool)
    if kind_of(kind).symmetric:
        # The Hessian is symmetric: a superset stays one.
        pattern = (pattern + pattern.T).tocsr()
    pattern.sum_duplicates()
    pattern.sort_indices()
    where = "at this x only" if mode == "local" else "at any x"
    reason = (f"{kind} pattern {pattern.shape[0]:,} x {pattern.shape[1]:,}, "
              f"{pattern.nnz:,} nonzeros, holds {where}")
    return SparsityReport(pattern, False, time.perf_counter() - began, reason, mode,
                          tuple(ctx.warnings))


# NOTE: [probe only where propagation is not cheaper]
# The dense probe's forward and backward pass cost more than propagating a
# graph of elementwise and movement ops (heat N = 1000 in a fresh process:
# 5-10 evaluations of fn, a third of the detection). So fn is recorded first
# (the recording the propagation needs anyway; a dense problem pays it on
# top of the probe: the MLP at n = m = 20,000, hidden 256, gives up in
# 0.018-0.023 s, about 7 forward passes, against 0.011 s, 4, when the probe
# ran first; heat N = 1000 detects in half the time), and a graph of
# _CHEAP_RULES alone is propagated before any probe. The probe then runs only
# where its verdict could differ: the propagation hit the cap or refused
# (a dense verdict wins, with the probe's reason, as when it ran first), or
# every row the probe samples holds more than max_density * n entries (J at
# x lies inside the pattern, so a sparser row ends the probe with None). The
# one difference: autograd's NaN from 0 * inf outside the pattern (sqrt at
# 0) no longer makes a probe call such a graph dense. Graphs with reductions,
# contractions, convolutions, writes or ops without a rule (where a dense
# block may take long to build before the cap stops it) are probed first.

#: Rules whose propagation costs about what the recorded values do (index maps and
#: unions of same-shape patterns).
_CHEAP_RULES = frozenset((rules.constant, rules.no_derivative, rules.identity, rules.pointwise,
                          rules.multiply, rules.where, rules.movement))


def _cheap_to_propagate(gm: torch.fx.GraphModule) -> bool:
    """Whether every op of ``gm`` has one of :data:`_CHEAP_RULES` (no reductions,
    contractions, convolutions, writes or ops without a rule)."""
    return all(node.target is operator.getitem or rule_for(node.target) in _CHEAP_RULES
               for node in gm.graph.nodes if node.op == "call_function")


def _probe_may_say_dense(pattern: sp.csr_matrix | None, max_density: float | None) -> bool:
    """Whether :func:`_dense_probe` could call this detected pattern dense: only if every row
    it samples has more than ``max_density * n`` entries (J at x lies inside the pattern, so
    a sparser row ends the probe with None)."""
    if pattern is None or max_density is None:
        return True
    m, n = pattern.shape
    if m == 0 or n == 0:
        return False
    counts = np.diff(pattern.indptr)[_probe_rows(m).numpy()]
    return bool(counts.min() > max_density * n)


def _probe_rows(m: int) -> torch.Tensor:
    """The rows of J the dense probe samples (interior, spread over the output)."""
    rows = torch.linspace(0, m - 1, min(_PROBE_ROWS, m) + 2).round().long()[1:-1]
    return rows.unique()


# ---------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------


def _dense_probe(fn: Callable, x: torch.Tensor, max_density: float, max_bytes: int | None
                 ) -> str | None:
    """Why the Jacobian is dense, judged from a few of its rows at x; None if not clearly so.

    NOTE: [dense probe]
    Nonzeros of J at x lie inside any valid pattern, so if every sampled row
    (_PROBE_ROWS interior rows spread over the output, plain reverse-mode
    autograd from one recorded forward pass) is denser than ``max_density``,
    colouring is pointless and tracing is skipped. The first sparse row ends
    the probe: on a sparse problem it costs one forward and one backward. On
    jobs/mlp.py at n = m = 20,000 tracing and propagating cost about 15
    forward passes, the probe with 2 rows about 3 (3 rows: 4). The rows are
    interior (m/3, 2m/3): first and last rows are where boundary conditions
    and global constraints tend to put dense rows. A probe that is wrong can
    only send a sparse problem down the dense path (slower, same values).
    (torch.func.vjp with vmap over the rows was 10x slower on the heat
    residual: functorch's per-op overhead.)
    """
    try:
        xr = x.detach().reshape(-1).clone().requires_grad_(True)
        with torch.enable_grad():
            y = fn(xr.reshape(x.shape)).reshape(-1)
            m, n = y.numel(), x.numel()
            if m == 0 or n == 0 or not y.requires_grad:
                return None
            rows = _probe_rows(m)
            # The first sparse row ends the probe (a sparse problem pays one
            # backward). NOTE: is_grads_batched (vmap) was 10x slower here.
            fewest = n
            for k, row in enumerate(rows.tolist()):
                (g,) = torch.autograd.grad(y[row], xr, retain_graph=k < rows.numel() - 1,
                                           allow_unused=True)
                fewest = min(fewest, 0 if g is None else int(torch.count_nonzero(g)))
                if fewest <= max_density * n:
                    return None
    except Exception:  # the probe is an optimisation: tracing gives the real answer
        return None
    ctx = Context(n, m, "global", max_density, max_bytes)
    if fewest * m > ctx.cap(m):
        return (f"dense probe: each of {rows.numel()} sampled rows of J at x has at least "
                f"{fewest:,} of {n:,} entries nonzero (cap: density {max_density:g})")
    return None


def _target(fn: Callable, kind: str) -> Callable:
    if not kind_of(kind).symmetric:
        return fn

    def scalar(t: torch.Tensor) -> torch.Tensor:
        y = fn(t)
        if not isinstance(y, torch.Tensor) or y.numel() != 1:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise SparsityError(f"kind='hessian' needs a scalar fn(x), got {shape}")
        return y.reshape(())

    return torch.func.grad(scalar)


@functools.cache
def _decompositions() -> dict:
    """Decompositions for every op without a rule of its own (core ATen first)."""
    from torch._decomp import core_aten_decompositions, decomposition_table

    from pipeline.maths.compiled import spare_dynamo_import

    spare_dynamo_import()  # their Python references may be wrapped by _disable_dynamo

    table = {**decomposition_table, **core_aten_decompositions()}
    return {op: f for op, f in table.items() if rule_for(op) is None and not is_random(op)}


def _decomposition(op: Any) -> Callable | None:
    """The decomposition the trace applies to ``op``: only ops without a rule look one up."""
    return None if rule_for(op) is not None else _decompositions().get(op)


def _record(fn: Callable, x: torch.Tensor, mode: str) -> torch.fx.GraphModule | None:
    """:func:`_trace`'s first try alone (the light recorder), or None where it cannot
    record ``fn`` (then :func:`_trace` goes on to its fallbacks, or says why)."""
    from pipeline.sparse.recorder import record

    try:  # (no spare_dynamo_import: the recorder skips dynamo; _decompositions spares it)
        return record(fn, x, decomposition=_decomposition, refuse_data_dependent=mode == "global")
    except Exception:  # _trace meets the same failure again and handles it
        return None


def _trace(target: Callable, x: torch.Tensor, mode: str) -> torch.fx.GraphModule:
    from pipeline.maths.compiled import spare_dynamo_import
    from pipeline.sparse.recorder import UnrecordedOutput, record

    spare_dynamo_import()  # a Hessian's trace runs torch.func.grad's backward (NOTE there)

    # NOTE: [first-call tax] make_fx and fake tensors import torch._dynamo,
    # torch._inductor and sympy (about 1.2 s of a fresh process's first
    # detection, 98 evaluations of the heat residual at N = 1000), so the
    # graph is recorded on real values by sparse/recorder.py; the decomposition
    # table (0.1-0.2 s) loads only when an op without a rule is met.
    # Global mode refuses reading a value computed from x (`.item()`,
    # `if tensor:`) there, where a fake-tensor trace would have failed,
    # instead of quietly burning in the value at this x; local mode lets
    # `.item()` return the value at x and records the branch taken. make_fx
    # (fake tensors in global mode) remains for what the recorder cannot follow.
    try:
        try:
            return record(target, x, decomposition=_decomposition,
                          refuse_data_dependent=mode == "global")
        except UnrecordedOutput:
            pass
        except RuntimeError as exc:  # a write into a constant: make_fx drops it (below)
            if _MUTATED_CONSTANT not in str(exc):
                raise
        try:
            return _make_fx(torch.func.functionalize(target), x, mode)
        except RuntimeError as exc:
            if _MUTATED_CONSTANT not in str(exc):
                raise
            # NOTE: fn writes into a tensor it closes over (the running statistics
            # of _native_batch_norm_legit): functionalize refuses that. Traced once
            # as it is, its writes into constants that nothing reads back are
            # dropped (they do not change fn(x)), and the rest is functionalized.
            plain = _drop_constant_writes(_make_fx(target, x, mode))
            return _make_fx(torch.func.functionalize(plain), x, mode)
    except SparsityError:
        raise
    except Exception as exc:  # torch raises many kinds here; say where it came from
        text = f"{type(exc).__name__}: {exc}".strip()
        if mode == "global" and any(k in text for k in _DATA_DEPENDENT_ERRORS):
            raise SparsityError(
                "global sparsity detection cannot follow data-dependent control flow or "
                "shapes on x (`.item()`, `if tensor:`, `bool(tensor)`, nonzero/masked_select "
                "of a tensor computed from x): the pattern could change with x. Use "
                "mode='local' for the pattern at this x only, or rewrite the branch with "
                f"torch.where. ({text.splitlines()[0][:200]})") from exc
        raise SparsityError(
            f"could not trace fn to ATen ops for sparsity detection: {text.splitlines()[0]}. "
            "fn must be a torch function of x (no .numpy(), no Python-side state)"
        ) from exc


_MUTATED_CONSTANT = "mutating a non-functional tensor"


def _make_fx(target: Callable, x: torch.Tensor, mode: str) -> torch.fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    # NOTE: global mode traces with fake tensors: reading a value computed
    # from x (`.item()`, `if tensor:`, `.numpy()`) fails there instead of
    # quietly burning in the value at this x. Local mode traces with real
    # values and _error_on_data_dependent_ops=False, so `.item()` returns the
    # value at x and the branch taken is recorded.
    return make_fx(target, decomposition_table=_decompositions(),
                   tracing_mode="fake" if mode == "global" else "real",
                   _allow_non_fake_inputs=True,
                   _error_on_data_dependent_ops=mode == "global")(x)


def _drop_constant_writes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` without its in-place writes into constants that nothing reads afterwards."""
    nodes = list(gm.graph.nodes)
    for i, node in enumerate(nodes):
        schema = getattr(node.target, "_schema", None)
        if not (node.op == "call_function" and schema is not None and schema.is_mutable
                and node.args and isinstance(node.args[0], torch.fx.Node)
                and node.args[0].op == "get_attr" and not node.users):
            continue
        target = node.args[0].target
        if not any(n.op == "get_attr" and n.target == target and n.users
                   for n in nodes[i + 1:]):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _writes_in_place(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an in-place op (``add_``, ``copy_``...) on a tensor of the graph."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.arguments or not node.args:
        return False
    alias = schema.arguments[0].alias_info
    return bool(alias is not None and alias.is_write and isinstance(node.args[0], torch.fx.Node))


def _is_view(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(node.op == "call_function" and schema is not None and schema.returns
                and schema.returns[0].alias_info is not None and not schema.is_mutable)


def _view_root(node: torch.fx.Node) -> torch.fx.Node:
    while _is_view(node) and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _refuse_unfunctionalized(gm: torch.fx.GraphModule) -> None:
    """Refuse a graph that still writes values computed from x in place into a view.

    NOTE: torch's Python decompositions run below functionalize, so their
    in-place ops reach the rules. One on a tensor of the graph (``clamp_min_``,
    ``add_``, ``copy_`` into a fresh ``new_empty``) is followed: the written
    tensor carries the op's result from there on. One into a *view* (a circular
    ``F.pad`` copies into slices of ``new_empty``) would change the base, which
    no rule sees: the pattern would silently miss it, so it is refused. (Writes
    of constants, such as the mask ``torch.combinations`` builds, are computed
    for real; writes into views of constants, the running statistics of
    instance norm, are not read back.)
    """
    from_x: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in from_x for a in node.all_input_nodes):
            from_x.add(node)
        if (_writes_in_place(node) and _is_view(node.args[0])
                and _view_root(node.args[0]).op != "get_attr"
                and any(a in from_x for a in node.all_input_nodes[1:])):
            raise SparsityError(
                f"sparsity detection cannot follow an in-place write ({node.target}) into a "
                "view that torch's tracing left in the graph (a circular F.pad does this): "
                "pass the pattern by hand (Problem.sparsity) or use the dense path")


def _refuse_random(gm: torch.fx.GraphModule) -> None:
    """Refuse every draw in the trace whose result is not fixed (:func:`draws_random`),
    also one ``fn`` seeds itself: the runner's watch accepts that one as deterministic, but
    the trace holds no seed (a job with ``--method auto`` then runs dense)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and draws_random(node.target, node.args, node.kwargs):
            raise SparsityError(
                f"fn uses a random op ({node.target}): unless seeded inside fn its Jacobian "
                "changes from call to call, and detection refuses every draw it traces. Draw "
                "the noise once outside fn and pass it as a constant (dropout: call "
                "model.eval())")


# ---------------------------------------------------------------------------
# Propagation
# ---------------------------------------------------------------------------


def _propagate(gm: torch.fx.GraphModule, x: torch.Tensor, ctx: Context) -> Dep:
    """Run the graph on real values, carrying each tensor's :class:`Dep`."""
    from torch.fx.node import Node

    nodes = list(gm.graph.nodes)
    last_use: dict[Node, int] = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    env: dict[Node, tuple[Any, Any]] = {}
    deferred = {node for node in nodes if _composes_with_its_user(node)}
    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            env[node] = (x.cpu(), Dep(rules.identity_pattern(ctx.n), True))
        elif node.op == "get_attr":
            env[node] = (_on_cpu(getattr(gm, node.target)), CONST)
        elif node.op == "call_function":
            env[node] = _call_node(node, env, ctx, node in deferred)
            if _writes_in_place(node):  # the written tensor carries the result from here on
                env[node.args[0]] = env[node]
        elif node.op == "output":
            out = node.args[0]
            if isinstance(out, tuple | list):
                out = out[0]
            value, dep = env[out]
            if not isinstance(value, torch.Tensor):
                raise SparsityError(f"fn must return a tensor, got {type(value).__name__}")
            return dep
        for arg in node.all_input_nodes:
            if last_use.get(arg) == i:
                env.pop(arg, None)
    raise SparsityError("traced graph has no output")


def _composable(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and op_name(node.target) in rules.COMPOSABLE
            and bool(node.args) and node.all_input_nodes == [node.args[0]]
            and not _writes_in_place(node))


def _composes_with_its_user(node: torch.fx.Node) -> bool:
    """A movement op whose one user is another, on it alone (NOTE: [composed movement])."""
    if not _composable(node) or len(node.users) != 1:
        return False
    (user,) = node.users
    return _composable(user) and user.args[0] is node


def _call_node(node: torch.fx.Node, env: dict, ctx: Context, defer: bool = False
               ) -> tuple[Any, Any]:
    """One call_function node's value and :class:`Dep`, from those of its arguments
    (``defer``: a :class:`~pipeline.sparse.rules.Moved` where allowed)."""
    from torch.fx.node import Node, map_aggregate

    args = map_aggregate(node.args, lambda a: env[a][0] if isinstance(a, Node) else a)
    kwargs = map_aggregate(node.kwargs, lambda a: env[a][0] if isinstance(a, Node) else a)
    deps = map_aggregate(node.args, lambda a: env[a][1] if isinstance(a, Node) else None)
    kwdeps = map_aggregate(node.kwargs, lambda a: env[a][1] if isinstance(a, Node) else None)
    if node.target is operator.getitem:
        return args[0][args[1]], deps[0][args[1]]
    try:
        return _call(node.target, tuple(args), dict(kwargs), tuple(deps), dict(kwdeps), ctx,
                     node.meta.get("val"), defer)
    except (Dense, SparsityError):
        raise
    except Exception as exc:  # computing the op itself failed: say which
        raise SparsityError(
            f"sparsity detection failed at {node.target} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); pass the pattern by hand "
            "(Problem.sparsity) or use the dense path") from exc


def _call(func: Any, args: tuple, kwargs: dict, deps: tuple, kwdeps: dict, ctx: Context,
          fake: Any, defer: bool = False) -> tuple[Any, Any]:
    rule = rule_for(func) or fallback
    tainted = any(d.tainted for d in _all_deps(deps) + _all_deps(list(kwdeps.values())))
    # NOTE: global mode never reads a value computed from x (the rules use
    # only its shape and dtype), so those values are not computed: the fake
    # tensor of the trace stands in. Constants are computed for real (they
    # are read as data: supports, indices, masks); so are creation ops fed a
    # value of x (zeros_like(x)), from real stand-ins of the same shape; and
    # so are ops whose shape the trace left symbolic (masked_select of x by a
    # constant mask, in torch.combinations): the shape is decided by constants.
    if ctx.local or not tainted or fake is None:
        out = func(*_on_cpu(args), **_on_cpu(kwargs))
    elif rule is constant or not _concrete(fake):
        out = func(*_on_cpu(_realized(args)), **_on_cpu(_realized(kwargs)))
    else:
        out = fake
    name = op_name(func)
    # Which inputs decide a value or a shape: all for .item()/nonzero, the
    # indices or mask (not the source) for index.Tensor/masked_select.
    deciding = deps if name in _DATA_DEPENDENT else deps[1:]
    if (name in _DATA_DEPENDENT or torch.Tag.dynamic_output_shape in func.tags) and any(
        d.tainted for d in _all_deps(deciding) + _all_deps(list(kwdeps.values()))
    ):
        what = (f"data-dependent control flow or shapes on x ({func}: `.item()`, "
                "`if tensor:`, `bool(tensor)`, nonzero/masked_select/unique of a tensor "
                "computed from x)")
        if ctx.mode == "global":
            raise SparsityError(
                f"global sparsity detection cannot follow {what}: the pattern could change "
                "with x. Use mode='local' for the pattern at this x only, or rewrite the "
                "branch with torch.where")
        ctx.warnings.append(f"followed {what} at this x: the pattern holds at this x only")
    op = Op(func, args, kwargs, deps, kwdeps, out, ctx)
    if defer and rule is rules.movement and rules.defers(op):
        return out, rules.Moved(op, deps[0].tainted)  # a floating tensor: no _non_float
    try:
        dep = rule(op)
    except (Dense, SparsityError):
        raise
    except Exception as exc:  # a rule met a case it does not know: a dense block, said once
        ctx.warn(str(func), f"sparsity: the rule for {func} failed ({type(exc).__name__}: "
                            f"{first_line(exc, limit=120)}); every output of it is taken to "
                            "depend on all of its inputs (a dense block)")
        dep = fallback(op, quiet=True)
    return out, _non_float(out, dep)


def _on_cpu(values: Any) -> Any:
    """Real tensors moved to the CPU and ``device=`` set to it: patterns are built there."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(values, torch.Tensor) and not isinstance(values, FakeTensor):
        return values.cpu()
    if isinstance(values, torch.device):
        return torch.device("cpu")
    if isinstance(values, list | tuple):
        return type(values)(_on_cpu(v) for v in values)
    if isinstance(values, dict):
        return {k: _on_cpu(v) for k, v in values.items()}
    return values


def _concrete(fake: Any) -> bool:
    """Whether every shape in a traced value is a plain int (not a data-dependent symbol)."""
    if isinstance(fake, torch.Tensor):
        return all(isinstance(s, int) for s in fake.shape)
    if isinstance(fake, list | tuple):
        return all(_concrete(f) for f in fake)
    return True


def _realized(values: Any) -> Any:
    """Fake tensors replaced by real empty ones of the same shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(values, FakeTensor):
        return torch.empty(values.shape, dtype=values.dtype)
    if isinstance(values, list | tuple):
        return type(values)(_realized(v) for v in values)
    if isinstance(values, dict):
        return {k: _realized(v) for k, v in values.items()}
    return values


def _non_float(out: Any, dep: Any) -> Any:
    """Integer and boolean results have no derivative: drop their pattern, keep the taint."""
    if isinstance(out, tuple | list) and isinstance(dep, list | tuple):
        return [_non_float(o, d) for o, d in zip(out, dep, strict=True)]
    if isinstance(dep, Dep) and dep.pattern is not None and (
        not isinstance(out, torch.Tensor) or not (out.is_floating_point() or out.is_complex())
    ):
        return Dep(None, dep.tainted)
    return dep


def _all_deps(deps: Any) -> list[Dep]:
    if isinstance(deps, Dep):
        return [deps]
    if isinstance(deps, list | tuple):
        return [d for x in deps for d in _all_deps(x)]
    return []
