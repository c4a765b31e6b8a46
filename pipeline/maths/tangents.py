"""Forward mode through products with a constant matrix, without its zero tangent.

NOTE: [Constant weights in forward mode]
    PyTorch's forward-mode formula for ``W @ h`` is ``W_t @ h + W @ h_t``.
    When ``W`` is a constant of ``fn`` (a weight, not a function of ``x``)
    its tangent is undefined, and the formula replaces it by a zero tensor
    of ``W``'s shape that the product then materialises: ``torch.func.jvp``
    of ``lambda h: W @ h`` with ``W`` 50,000 x 512 took 103-110 ms on this
    machine against 11 ms for ``W @ h`` itself (102 MB of zeros written,
    then a product with them). ``torch.func.jacfwd`` pays it on every such
    layer: on the tall mlp 16 -> 512 -> 50,000 it is most of its time.

    :func:`constant_products` is a ``TorchFunctionMode`` the engine holds
    around its eager forward-mode passes. A ``matmul`` (``@``, ``mv``,
    ``mm``) or ``F.linear`` whose matrix is a plain tensor (not wrapped by
    ``torch.func``, so it carries no tangent of this pass) and whose other
    operand is wrapped (it carries the tangents) runs as an
    ``autograd.Function`` whose forward-mode rule is the product of the
    matrix with the tangent alone; every other call runs unchanged. Its
    backward recomputes the product by autograd, so a graph recorded
    through it (a module's weights require grad) is still correct.

    The rows it gives are checked like every forward-mode chunk: ``u . (J
    v)`` against one plain reverse-mode VJP that does not use it (NOTE: in
    :func:`pipeline.maths.engine._jacobian_forward_gap`), and a rule made
    wrong on purpose is caught (tested). ``python -m benchmarks.engine``
    times it on the tall mlp against ``jacfwd``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: The other operand's dimensions each product takes, with the plain matrix on the
#: left and on the right (``mv`` takes no vector on its left: that call raises, as
#: PyTorch's own does).
_OPERANDS = {"matmul": ((1, 2), (1, 2)), "__matmul__": ((1, 2), (1, 2)),
             "mm": ((2,), (2,)), "mv": ((1,), ())}
_MATMULS = frozenset(_OPERANDS)

#: The smallest constant matrix (in entries) worth a rule of its own: below it a
#: zero tangent costs less than the mode's own per-call overhead (a few us an op,
#: 6-9% of a small forward-mode call such as a (30, 40) map through a 40 x 50 W).
MIN_NUMEL = 2**16


def _wrapped(t: Any) -> bool:
    return isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)


#: Tensors taken as constants: plain ones and a module's parameters (no subclass
#: whose ``__torch_function__`` would see a different call).
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _plain_matrix(t: Any) -> bool:
    return (type(t) in _PLAIN_TYPES and t.dim() == 2 and t.numel() >= MIN_NUMEL
            and t.is_floating_point() and not torch._C._functorch.is_functorch_wrapped_tensor(t))


class _Product(torch.autograd.Function):
    """``a @ b`` where the plain one of them (``plain`` 0: ``a``, 1: ``b``) is a constant
    of this pass: its tangent is left out."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor, b: Tensor, plain: int) -> Tensor:
        return a @ b

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, int], output: Tensor) -> None:
        ctx.set_materialize_grads(False)
        a, b, ctx.plain = inputs
        ctx.save_for_backward(a, b)
        ctx.save_for_forward(a if ctx.plain == 0 else b)

    @staticmethod
    def jvp(ctx: Any, a_t: Tensor | None, b_t: Tensor | None, _: None) -> Tensor:
        (constant,) = ctx.saved_tensors
        return constant @ b_t if ctx.plain == 0 else a_t @ constant

    @staticmethod
    def backward(ctx: Any, g: Tensor | None) -> tuple[Tensor | None, Tensor | None, None]:
        """``matmul``'s backward for 1-d and 2-d operands, by plain ops (it may run under
        a ``torch.func`` transform of ``fn``'s own, where new leaves cannot be made)."""
        if g is None:
            return None, None, None
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        if a.dim() == 2 and b.dim() == 1:  # (p, k) @ (k,) -> (p,)
            ga = torch.outer(g, b) if need_a else None
            gb = a.mT @ g if need_b else None
        elif a.dim() == 1:  # (k,) @ (k, q) -> (q,)
            ga = b @ g if need_a else None
            gb = torch.outer(a, g) if need_b else None
        else:  # (p, k) @ (k, q) -> (p, q)
            ga = g @ b.mT if need_a else None
            gb = a.mT @ g if need_b else None
        return ga, gb, None


class _Linear(torch.autograd.Function):
    """``F.linear(h, w, bias)`` with ``w`` and ``bias`` plain: the tangent is ``h_t @ w.T``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return torch.nn.functional.linear(h, w, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor | None],
                      output: Tensor) -> None:
        ctx.set_materialize_grads(False)
        h, w, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(h, w, *(() if bias is None else (bias,)))
        ctx.save_for_forward(w)

    @staticmethod
    def jvp(ctx: Any, h_t: Tensor | None, w_t: Tensor | None, b_t: Tensor | None) -> Tensor:
        (w,) = ctx.saved_tensors
        return torch.nn.functional.linear(h_t, w)

    @staticmethod
    def backward(ctx: Any, g: Tensor | None) -> tuple[Tensor | None, ...]:
        """``F.linear``'s backward by plain ops (see :meth:`_Product.backward`)."""
        if g is None:
            return None, None, None
        h, w = ctx.saved_tensors[:2]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = g.reshape(-1, g.shape[-1])
        gh = g @ w if need_h else None
        gw = g2.mT @ h.reshape(-1, h.shape[-1]) if need_w else None
        gb = g2.sum(0) if need_b and ctx.has_bias else None
        return gh, gw, gb


class _ConstantProducts(TorchFunctionMode):
    """NOTE: [Constant weights in forward mode]; ``hits`` counts the products it took."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", None)
        if not kwargs and len(args) == 2 and name in _MATMULS:
            a, b = args
            for plain, (c, h) in enumerate(((a, b), (b, a))):
                if _plain_matrix(c) and _wrapped(h) and h.dim() in _OPERANDS[name][plain]:
                    self.hits += 1
                    return _Product.apply(a, b, plain)
        elif name == "linear" and func is torch.nn.functional.linear:
            found = _linear_args(args, kwargs or {})
            if found is not None:
                self.hits += 1
                return _Linear.apply(*found)
        return func(*args, **(kwargs or {}))


def _linear_args(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """``(h, w, bias)`` of an ``F.linear`` call with ``h`` wrapped, ``w`` and ``bias`` plain."""
    names = ("input", "weight", "bias")
    if len(args) > 3 or any(k not in names for k in kwargs):
        return None
    given = dict(zip(names, args, strict=False)) | kwargs
    h, w, bias = given.get("input"), given.get("weight"), given.get("bias")
    if not (_wrapped(h) and _plain_matrix(w)):
        return None
    if bias is not None and not (type(bias) in _PLAIN_TYPES and not _wrapped(bias)):
        return None
    return h, w, bias


@contextlib.contextmanager
def constant_products() -> Iterator[_ConstantProducts]:
    """Forward-mode passes inside skip constant matrices' zero tangents (NOTE above);
    the mode's ``hits`` says how many products it took."""
    with _ConstantProducts() as mode:
        yield mode
