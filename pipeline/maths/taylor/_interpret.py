"""The graph interpreter: runs a traced ATen graph on jets, one rule per node.

Nodes whose arguments do not depend on ``x`` run as they are (weights,
masks, index tensors); a node with jet arguments computes its output at the
point, then its higher coefficients by the op's rule (:mod:`._rules`), or,
for an op without one, by nested forward mode on that op alone (NOTE:
[fallback]). Outputs that are not floating (comparisons, indices) carry no
coefficients. Every value is dropped after its last use.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._errors import TaylorFallbackWarning
from ._rules import CONSTANT, NO_RULE, UNARY, op_name, rule_for
from ._series import Jet, Series

_WARNED: set[str] = set()


def interpret(gm: torch.fx.GraphModule, s: Series, x: Jet) -> Jet | torch.Tensor:
    """Push the jet ``x`` through ``gm``; returns the output's jet (a tensor if constant)."""
    nodes = list(gm.graph.nodes)
    last: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last[arg] = i
    env: dict[torch.fx.Node, Any] = {}

    def value(a: Any) -> Any:
        return env[a] if isinstance(a, torch.fx.Node) else a

    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            env[node] = x
        elif node.op == "get_attr":
            env[node] = getattr(gm, node.target)
        elif node.op == "call_function":
            args = torch.fx.node.map_aggregate(node.args, value)
            kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
            s.overwrite = node.meta.get("taylor_temporary", False)
            env[node] = call(s, node.target, args, kwargs)
        elif node.op == "output":
            return value(node.args[0])
        for arg in node.all_input_nodes:
            if last.get(arg) == i:
                del env[arg]
    raise AssertionError("graph without output")


# NOTE: [temporaries]
# An elementwise op whose argument is a fresh product (mm, addmm, conv, another
# elementwise op) reached through single-user views (view, squeeze, a constant bias
# add, ...) holds the only reference to that memory: its rule may form the linear
# term d1 * x_k there (no allocation; on CPU, fresh big blocks cost page faults).
# Marked once per trace; the rule still checks contiguity, autograd and functorch.
_FRESH = frozenset(["mm", "bmm", "matmul", "addmm", "convolution", *UNARY])
_VIEWS = frozenset(["view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "alias",
                    "clone", "expand", "add", "sub"])


def mark_temporaries(gm: torch.fx.GraphModule) -> None:
    """Mark the elementwise nodes whose argument is a temporary (NOTE: [temporaries])."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and op_name(node.target) in UNARY:
            node.meta["taylor_temporary"] = _temporary(node.args[0])


def _temporary(a: Any) -> bool:
    while isinstance(a, torch.fx.Node) and a.op == "call_function" and len(a.users) == 1:
        name = op_name(a.target)
        if name in _FRESH:
            return True
        if name not in _VIEWS:
            return False
        a = a.args[0]
    return False


def call(s: Series, op: Any, args: tuple, kwargs: dict) -> Any:
    """One op on jets and constants."""
    if op is operator.getitem:
        return args[0][args[1]]
    flat, spec = tree_flatten((args, kwargs))
    if not any(isinstance(a, Jet) for a in flat):
        return op(*args, **kwargs)
    pargs, pkwargs = tree_unflatten([a.primal if isinstance(a, Jet) else a for a in flat], spec)
    y0 = op(*pargs, **pkwargs)
    if not any(_floating(y) for y in tree_flatten(y0)[0]):
        return y0
    rule = rule_for(op)
    out = NO_RULE if rule is None else rule(s, op, args, kwargs, y0)
    if out is NO_RULE:
        out = fallback(s, op, args, kwargs, y0)
    return _assemble(y0, out)


def _floating(y: Any) -> bool:
    return isinstance(y, torch.Tensor) and (y.is_floating_point() or y.is_complex())


def _assemble(y0: Any, out: Any) -> Any:
    if out is CONSTANT:
        return y0
    if isinstance(out, tuple):
        return type(y0)(_assemble(y, o) for y, o in zip(y0, out, strict=True))
    return Jet([y0.unsqueeze(0), *out])


# NOTE: [fallback]
# An op without a rule is differentiated along t by nested forward mode:
# h(t) = op(p(t)) with p(t) = sum_k x_k t^k for every jet argument, and
# y_k = h^(k)(0) / k! from k nested torch.func.jvp (exact; 2^k evaluations of
# the op for order k), vmapped over the directions. In a collapsed series the
# top coefficients enter linearly with direction-free factors, so the
# per-direction pass runs with tops zero, its top is summed over the
# directions, and one jvp at the point along the summed tops is added.


def fallback(s: Series, op: Any, args: tuple, kwargs: dict, y0: Any) -> Any:
    """The higher coefficients of ``op`` by nested forward mode (NOTE: [fallback])."""
    name = str(op)
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"Taylor mode has no rule for {name}: it is differentiated by nested "
                      "forward mode (exact, slower)", TaylorFallbackWarning, stacklevel=2)
    flat, spec = tree_flatten((args, kwargs))
    where = [i for i, a in enumerate(flat) if isinstance(a, Jet)]
    outs, out_spec = tree_flatten(y0)
    keep = [i for i, o in enumerate(outs) if _floating(o)]
    order = s.order
    if order == 0:
        return _shape(y0, outs, out_spec, keep, [[] for _ in keep])
    low = order - 1 if s.collapsed else order  # coefficients taken per direction

    def h(t: torch.Tensor, *coeffs: list) -> tuple:
        leaves = list(flat)
        for i, cs in zip(where, coeffs, strict=True):
            p = cs[-1] if cs else None
            for c in reversed(cs[:-1]):
                p = c + t * p
            leaves[i] = flat[i].primal if p is None else flat[i].primal + t * p
        a, kw = tree_unflatten(leaves, spec)
        got = tree_flatten(op(*a, **kw))[0]
        return tuple(got[i] for i in keep)

    dtype = next(outs[i] for i in keep).dtype
    t0 = torch.zeros((), dtype=flat[where[0]].primal.dtype)
    per_dir = [[flat[i][k].expand(s.directions, *flat[i][k].shape[1:]) for k in
                range(1, low + 1)] for i in where]

    def derivatives(*coeffs: list) -> list:
        got, f = [], (lambda t: h(t, *coeffs))
        for k in range(1, order + 1):
            f = _differentiated(f)
            got.append(tuple(d / math.factorial(k) for d in f(t0)))
        return got

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        try:
            got = torch.func.vmap(derivatives)(*per_dir)
        except RuntimeError:  # no batching rule: one direction at a time
            rows = [derivatives(*[[c[d] for c in cs] for cs in per_dir])
                    for d in range(s.directions)]
            got = [tuple(torch.stack(parts) for parts in zip(*[r[k] for r in rows],
                                                             strict=True))
                   for k in range(order)]
        if s.collapsed:
            top = _top_jvp(op, flat, spec, where, keep, order)
            got[-1] = tuple(s.reduce(g) + t.unsqueeze(0) for g, t in zip(got[-1], top,
                                                                          strict=True))
    per_out = [[got[k][j].to(dtype) for k in range(order)] for j in range(len(keep))]
    return _shape(y0, outs, out_spec, keep, per_out)


def _differentiated(f: Any) -> Any:
    def df(t: torch.Tensor) -> tuple:
        return torch.func.jvp(f, (t,), (torch.ones_like(t),))[1]

    return df


def _top_jvp(op: Any, flat: list, spec: Any, where: list, keep: list, order: int) -> tuple:
    def g(*points: torch.Tensor) -> tuple:
        leaves = list(flat)
        for i, p in zip(where, points, strict=True):
            leaves[i] = p
        a, kw = tree_unflatten(leaves, spec)
        got = tree_flatten(op(*a, **kw))[0]
        return tuple(got[i] for i in keep)

    primals = tuple(flat[i].primal for i in where)
    tangents = tuple(flat[i][order][0] for i in where)
    return torch.func.jvp(g, primals, tangents)[1]


def _shape(y0: Any, outs: list, out_spec: Any, keep: list, per_out: list) -> Any:
    if isinstance(y0, torch.Tensor):
        return per_out[0]
    got = [CONSTANT] * len(outs)
    for j, i in enumerate(keep):
        got[i] = per_out[j]
    return tuple(tree_unflatten(got, out_spec))
