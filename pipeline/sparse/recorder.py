"""A light ATen tracer for sparsity detection: one recording pass, no torch.compile stack.

``make_fx`` (and ``FakeTensorMode``) import ``torch._dynamo``, ``torch._inductor``
and sympy on first use: about 1.2 s of a fresh process's first detection on an
idle machine, against 20-70 ms for the trace itself. :func:`record` runs ``fn``
once on real values under a ``TorchDispatchMode`` that writes every ATen op
into an ``torch.fx.Graph`` (the same graph ``make_fx(functionalize(fn))``
gives, with each node's value in ``meta["val"]``; in global mode a floating
value computed from ``x`` is kept only as a stand-in of its shape and dtype:
NOTE: [values not kept]), applying a decomposition to ops that have one and
no rule. It imports nothing beyond ``torch.fx``.

Values computed from ``x`` are *tainted*. With ``refuse_data_dependent`` an
op that turns a tainted tensor into a Python value (``.item()``,
``if tensor:``) raises :class:`DataDependentRead`, as a fake-tensor trace
would; ops whose output shape depends on values are left to the
propagation, which knows which inputs decide them.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

_SHAPE_QUERIES = (torch.ops.aten.size.default, torch.ops.aten.stride.default,
                  torch.ops.aten.storage_offset.default)


class DataDependentRead(RuntimeError):
    """``fn`` read a value computed from ``x`` into Python (``_local_scalar_dense``)."""


class UnrecordedOutput(RuntimeError):
    """``fn`` returned a tensor no recorded op produced (the caller falls back to make_fx)."""


class _Recorder(TorchDispatchMode):
    """Writes each ATen op that reaches it into ``self.graph`` (see the module's docstring)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode wraps __torch_dispatch__ in torch._disable_dynamo
        # by default, which imports torch._dynamo on the first op: the cost
        # this tracer exists to avoid. Nothing here runs under torch.compile.
        return False

    def __init__(self, x: torch.Tensor, decomposition: Callable[[Any], Callable | None],
                 refuse_data_dependent: bool) -> None:
        super().__init__()
        self.graph = torch.fx.Graph()
        self.constants: dict[str, torch.Tensor] = {}
        # NOTE: [values not kept] tensors by id, weakly: fn frees what it no longer
        # holds, as it would outside the recording (a dead entry never matches).
        self._nodes: dict[int, tuple[torch.fx.Node, weakref.ref]] = {}
        self._tainted: set[torch.fx.Node] = set()
        self._decomposition = decomposition
        self._refuse = refuse_data_dependent
        placeholder = self.graph.placeholder("x")
        placeholder.meta["val"] = x
        self._nodes[id(x)] = (placeholder, weakref.ref(x))
        self._tainted.add(placeholder)

    def _node(self, value: torch.Tensor) -> torch.fx.Node | None:
        hit = self._nodes.get(id(value))
        return hit[0] if hit is not None and hit[1]() is value else None

    def node_of(self, value: Any) -> Any:
        """The node of a tensor (a new constant if no op made it); other values as they are."""
        if not isinstance(value, torch.Tensor):
            return value
        node = self._node(value)
        if node is not None:
            return node
        name = f"_tensor_constant{len(self.constants)}"
        self.constants[name] = value
        node = self.graph.get_attr(name)
        node.meta["val"] = value
        self._nodes[id(value)] = (node, weakref.ref(value))
        return node

    def recorded(self, value: torch.Tensor) -> bool:
        return self._node(value) is not None

    def kept(self, value: Any, tainted: bool) -> Any:
        """What ``meta["val"]`` keeps of an op's result.

        NOTE: [values not kept]
        Global mode never reads a value computed from x (the propagation uses
        its shape and dtype, as it does a fake tensor's), so such a result is
        kept as a stand-in of one element expanded to its shape, and the
        result itself is freed when fn drops it. Keeping every intermediate of
        the heat residual at N = 1000 alive (about 20 x 8 MB of fresh memory,
        each page faulted in) made the recording 3-8x one evaluation of fn in a
        fresh process. Constants, local mode, integer and boolean results
        (indices, masks, a factorisation's info) and the results of multi-output
        ops keep their values, and so do the inputs of an op with no tensor
        result (the propagation reruns it: ``_linalg_check_errors``).
        """
        if (self._refuse and tainted and isinstance(value, torch.Tensor)
                and (value.is_floating_point() or value.is_complex())):
            return torch.empty((), dtype=value.dtype, device=value.device).expand(value.shape)
        return value

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        decomposition = self._decomposition(func)
        if decomposition is not None:
            with self:
                out = decomposition(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func not in _SHAPE_QUERIES:  # CompositeImplicit ops into their parts, as make_fx
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        tainted = any(self._node(a) in self._tainted for a in tensors)
        if self._refuse and tainted and torch.Tag.data_dependent_output in func.tags:
            raise DataDependentRead(
                f"{func} read a value computed from x (data-dependent control flow)")
        node = self.graph.call_function(func, tree_map(self.node_of, args),
                                        tree_map(self.node_of, kwargs))
        out = func(*args, **kwargs)
        node.meta["val"] = self.kept(out, tainted)
        self._remember(node, out, tainted)
        if tainted and not isinstance(out, torch.Tensor | tuple | list):
            # No result to stand in for (_linalg_check_errors reads its info
            # tensor): the propagation reruns the op, on its inputs' values.
            for a in tensors:
                if (held := self._node(a)) is not None:
                    held.meta["val"] = a
        return out

    def _remember(self, node: torch.fx.Node, out: Any, tainted: bool) -> None:
        if isinstance(out, torch.Tensor):
            self._nodes[id(out)] = (node, weakref.ref(out))
            if tainted:
                self._tainted.add(node)
        elif isinstance(out, tuple | list):
            for i, item in enumerate(out):
                if isinstance(item, torch.Tensor):
                    part = self.graph.call_function(operator.getitem, (node, i))
                    part.meta["val"] = item
                    self._remember(part, item, tainted)


def record(target: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
           decomposition: Callable[[Any], Callable | None],
           refuse_data_dependent: bool) -> torch.fx.GraphModule:
    """Trace ``functionalize(target)`` at ``x`` (a copy: ``fn`` cannot write into it).

    Args:
        target: the function traced.
        x: the point.
        decomposition: the decomposition to apply to an op, or None to record it.
        refuse_data_dependent: raise :class:`DataDependentRead` on ``.item()``
            and the like of a value computed from ``x``.

    Returns:
        A GraphModule: placeholder ``x``, constants as attributes, one node per op.

    Raises:
        DataDependentRead: see above.
        UnrecordedOutput: the result is not a tensor some op made.
    """
    x = x.detach().clone()
    mode = _Recorder(x, decomposition, refuse_data_dependent)
    with mode:
        out = torch.func.functionalize(target)(x)
    if not isinstance(out, torch.Tensor) or not mode.recorded(out):
        raise UnrecordedOutput(f"fn returned {type(out).__name__} not made by a recorded op")
    last = mode.node_of(out)
    last.meta["val"] = out  # fn(x) itself, also where intermediates keep stand-ins
    mode.graph.output(last)
    root = torch.nn.Module()
    for name, value in mode.constants.items():
        setattr(root, name, value)
    return torch.fx.GraphModule(root, mode.graph)
