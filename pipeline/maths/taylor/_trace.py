"""Tracing a function of one tensor to an ATen graph, once per input shape and dtype.

``make_fx`` over ``functionalize`` (in-place writes arrive as functional ops)
with decompositions for the ops that have no Taylor rule of their own: core
ATen's, plus a few composite ops (softmax, layer norm, gelu, norms) that core
ATen keeps but whose parts all have rules. Tracing is *fake* (shapes only),
so a trace holds for every ``x`` of its shape; a function that branches on
values of ``x`` is traced for real at the given ``x`` and not cached.

The tensors ``fn`` closes over (weights) stay in the graph as the very same
tensor objects, so running the graph eagerly records autograd for them and
sees in-place updates (optimizer steps); a function that *rebinds* them must be
wrapped anew (``laplacian(fn)`` again) or the cache cleared with
:func:`clear_cache`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import weakref
from collections.abc import Callable

import torch

from ._errors import RandomOpError, TaylorError
from ._interpret import mark_temporaries
from ._rules import KINKS, has_rule, op_name

log = logging.getLogger("pipeline.maths.taylor")

_RANDOM = frozenset(["rand", "randn", "rand_like", "randn_like", "randint", "randint_like",
                     "bernoulli", "normal", "uniform", "exponential", "geometric", "cauchy",
                     "log_normal", "multinomial", "native_dropout", "dropout", "poisson",
                     "randperm", "rrelu_with_noise", "feature_dropout", "alpha_dropout"])
# Composite ops outside core ATen's decompositions whose parts all have rules.
_EXTRA = ["_softmax", "_log_softmax", "native_layer_norm", "gelu", "linalg_vector_norm",
          "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
          "native_group_norm", "elu", "hardtanh", "log_sigmoid_forward", "logsigmoid", "mish",
          "silu", "softplus", "hardswish", "hardsigmoid", "leaky_relu", "celu", "selu",
          "logsumexp", "mse_loss", "smooth_l1_loss", "huber_loss",
          "linalg_norm", "norm", "frobenius_norm", "nuclear_norm", "cosine_similarity",
          "pairwise_distance", "cdist", "addcmul", "addcdiv", "lerp", "xlogy", "square",
          "glu", "softmax", "log_softmax", "layer_norm", "group_norm", "batch_norm"]

# fn -> {(shape, dtype, device, batched): GraphModule}; weak, so a dropped fn frees its traces.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_random(op: object) -> bool:
    return op_name(op) in _RANDOM or torch.Tag.nondeterministic_seeded in getattr(op, "tags", ())


@functools.cache
def decompositions() -> dict:
    """Decompositions for every op without a Taylor rule (core ATen's, then a few composites)."""
    from torch._decomp import core_aten_decompositions, decomposition_table

    table = dict(core_aten_decompositions())
    extra = set(_EXTRA)
    for op, f in decomposition_table.items():
        if op_name(op) in extra and op not in table:
            table[op] = f
    table = {op: f for op, f in table.items() if not has_rule(op) and not is_random(op)}
    aten = torch.ops.aten
    table[aten.var_mean.correction] = _var_mean
    table[aten.var.correction] = lambda *a, **k: _var_mean(*a, **k)[0]
    return table


def _var_mean(x: torch.Tensor, dim: list[int] | None = None, *, correction: float | None = None,
              keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """var_mean in ATen ops that have rules (torch's own decomposition leaves prims)."""
    dims = list(range(x.ndim)) if dim is None or len(dim) == 0 else list(dim)
    n = math.prod(x.shape[d] for d in dims) if x.ndim else 1
    mean = torch.mean(x, dims, keepdim=True)
    dev = x - mean
    var = torch.sum(dev * dev, dims, keepdim=keepdim) / max(n - (1 if correction is None
                                                                  else correction), 0)
    return var, mean if keepdim else torch.squeeze(mean, dims)


def clear_cache() -> None:
    """Forget every cached trace (after rebinding a tensor a traced ``fn`` closes over)."""
    _CACHE.clear()


def trace(fn: Callable, x: torch.Tensor, *, batched: bool) -> torch.fx.GraphModule:
    """The ATen graph of ``fn`` (of ``vmap(fn)`` when ``batched``) at ``x``'s shape and dtype."""
    key = (tuple(x.shape), x.dtype, x.device, batched)
    try:
        per_fn = _CACHE.setdefault(fn, {})
    except TypeError:  # not weakly referenceable: trace every call
        per_fn = {}
    gm = per_fn.get(key)
    if gm is None:
        gm, cacheable = _trace(fn, x, batched)
        if cacheable:
            per_fn[key] = gm
    return gm


def _under_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, jvp) is active in this thread."""
    return torch._C._functorch.maybe_current_level() is not None


def _trace(fn: Callable, x: torch.Tensor, batched: bool) -> tuple[torch.fx.GraphModule, bool]:
    from torch.fx.experimental.proxy_tensor import make_fx

    target = torch.func.vmap(fn) if batched else fn

    def run(mode: str, at: torch.Tensor) -> torch.fx.GraphModule:
        traced = make_fx(torch.func.functionalize(target), decomposition_table=decompositions(),
                         tracing_mode=mode, _allow_non_fake_inputs=True,
                         _error_on_data_dependent_ops=mode == "fake")
        if mode != "fake" or not _under_transform():
            return traced(at)
        # NOTE: traced under a torch.func transform the caller runs (vjp, grad,
        # vmap), the input is that level's tensor and make_fx records it as a
        # constant: the graph then ignores x (zero gradients). The transform
        # stack is per thread, so a fresh thread traces as if outside it.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(traced, torch.empty(at.shape, dtype=at.dtype,
                                                   device=at.device)).result()

    blank = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    try:
        gm, cacheable = run("fake", blank), True
    except Exception as fake_exc:  # data-dependent control flow or shapes: trace at this x
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            raise TaylorError(
                "cannot trace fn without looking at the values of x (it branches on them, or "
                "an op has no shape rule), and under vmap the values are not at hand: call "
                "the transform without vmap (batched=True), or rewrite the branch with "
                f"torch.where ({_first_line(fake_exc)})") from fake_exc
        try:
            gm, cacheable = run("real", x.detach()), False
        except Exception as exc:
            raise TaylorError(
                f"could not trace fn to ATen ops: {_first_line(exc)}. fn must be a torch "
                "function of one tensor x returning one tensor (no .numpy(), no Python-side "
                "state)") from exc
    _check(gm)
    return gm, cacheable


def _check(gm: torch.fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    kinks = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        node.target = _functional(node.target)
        if is_random(node.target):
            raise RandomOpError(
                f"fn uses a random op ({node.target}): its derivatives change from call to "
                "call. Pass the noise in as a constant tensor (dropout: call model.eval())")
        if str(node.target).startswith("prims.") and not has_rule(node.target):
            # prims have no forward-mode formulas: nested jvp through them would be wrong
            raise TaylorError(f"internal: a decomposition left {node.target}, which has no "
                              "Taylor rule; please report fn")
        if op_name(node.target) in KINKS:
            kinks.add(op_name(node.target))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and torch._C._functorch.is_functorch_wrapped_tensor(
                getattr(gm, node.target)):
            # make_fx does not keep a transform's wrapper on a captured tensor: derivatives
            # through it (torch.func.grad over the weights fn closes over) would be wrong
            raise TaylorError(
                "fn closes over a tensor of an enclosing torch.func transform (grad, jacrev, "
                "vmap over weights): Taylor mode cannot differentiate through it. Take "
                "gradients with respect to the weights by autograd (loss.backward()), or vmap "
                "over the points x only")
    outputs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    if not isinstance(outputs, torch.fx.Node):
        raise TaylorError(f"fn must return one tensor, got {type(outputs).__name__} of "
                          "values: return a single tensor (torch.stack or torch.cat several)")
    if kinks:
        log.info("Taylor mode: fn has non-smooth ops %s; their derivatives follow the branch "
                 "taken at x (one-sided at a kink)", sorted(kinks))
    mark_temporaries(gm)
    gm.recompile()


def _functional(op: object) -> object:
    """The out-of-place twin of an in-place op a decomposition left (``squeeze_``)."""
    name = op_name(op)
    if not name.endswith("_") or name.endswith("__"):
        return op
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, getattr(op, "_overloadname", "default"), op) if packet else op


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300]
