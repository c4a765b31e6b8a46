"""The Taylor rules: one table from ATen op name to the rule that pushes a jet through it.

A rule is called as ``rule(s, op, args, kwargs, y0)``: ``s`` the
:class:`~._series.Series`, ``args``/``kwargs`` the op's arguments with
:class:`~._series.Jet` where a value depends on ``x``, and ``y0`` the op's
output at the point (already computed). It returns the higher coefficients
``[y1, ..., yK]`` (each ``(s.size(k), *y0.shape)``), :data:`CONSTANT` when the
output does not vary with ``x`` to first and higher orders (``floor``,
``sign``, ``zeros_like``), a tuple of those for multi-output ops, or
:data:`NO_RULE` when these arguments are not covered (the interpreter then
uses nested forward mode, exact).

Families: linear ops (every coefficient through the op, the affine part only
at order 0), products (Cauchy), elementwise functions (Faa di Bruno from the
function's Taylor coefficients at ``x0``), non-smooth ops (the branch taken at
``x0``: higher coefficients masked or selected by ``x0``'s branch, as torch's
own forward mode does) and reductions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _series as ser
from ._series import Jet, Series

CONSTANT = object()
NO_RULE = object()

Rule = Callable[..., Any]


def op_name(op: object) -> str:
    """``aten.mul.Tensor`` -> ``"mul"`` (the overload packet's name)."""
    packet = getattr(op, "overloadpacket", None)
    return getattr(packet, "__name__", str(op)).split(".")[-1]


def overload(op: object) -> str:
    return getattr(op, "_overloadname", "default")


# ---------------------------------------------------------------------------
# Shapes: every coefficient has a leading direction axis
# ---------------------------------------------------------------------------


def fit(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` of shape ``(n, *S)`` broadcast to ``(n, *shape)`` (a view)."""
    extra = len(shape) - (t.ndim - 1)
    if extra > 0:
        t = t.reshape(t.shape[0], *([1] * extra), *t.shape[1:])
    return t.expand(t.shape[0], *shape)


def lift(t: Any, ndim: int) -> Any:
    """``t`` of shape ``(n, *S)`` with ones inserted after ``n`` up to ``ndim`` trailing dims."""
    if not isinstance(t, torch.Tensor):
        return t
    extra = ndim - (t.ndim - 1)
    return t.reshape(t.shape[0], *([1] * extra), *t.shape[1:]) if extra > 0 else t


def zeros(s: Series, k: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros((s.size(k), *like.shape))


def dim_of(d: int, ndim: int) -> int:
    """A dim of the op's tensor as a dim of the coefficient (one leading axis more)."""
    return (d % max(ndim, 1)) + 1


def dims_of(dims: Any, ndim: int) -> list[int]:
    """Reduction dims (``None`` or ``[]``: all) as dims of the op's tensor."""
    if dims is None or (not isinstance(dims, int) and len(dims) == 0):
        return list(range(ndim))
    dims = [dims] if isinstance(dims, int) else dims
    return sorted({d % max(ndim, 1) for d in dims})


def each(jet: Jet, fn: Callable[[torch.Tensor], torch.Tensor]) -> list:
    return [fn(c) for c in jet[1:]]


def bound(op: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by name, defaults filled in from its schema."""
    out = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def jets(args: Any) -> list[Jet]:
    return [a for a in args if isinstance(a, Jet)]


# ---------------------------------------------------------------------------
# Linear ops
# ---------------------------------------------------------------------------


def reshaped(s, op, args, kwargs, y0):
    return each(args[0], lambda c: c.reshape(c.shape[0], *y0.shape))


def expanded(s, op, args, kwargs, y0):
    return each(args[0], lambda c: fit(c, y0.shape))


def converted(s, op, args, kwargs, y0):
    return each(args[0], lambda c: c.to(y0.dtype))


def permuted(s, op, args, kwargs, y0):
    nd = args[0].primal.ndim
    name = op_name(op).removesuffix("_copy")
    if name == "permute":
        dims = [dim_of(d, nd) for d in args[1]]
        return each(args[0], lambda c: c.permute(0, *dims))
    if nd < 2:
        return each(args[0], lambda c: c)
    a, b = (0, 1) if name == "t" else (args[1], args[2])
    return each(args[0], lambda c: c.transpose(dim_of(a, nd), dim_of(b, nd)))


def reduced(s, op, args, kwargs, y0):
    """sum/mean over dims (``dim=None`` or ``[]``: all of them)."""
    x = args[0]
    nd = x.primal.ndim
    a = bound(op, args, kwargs)
    if nd == 0:
        return each(x, lambda c: c.to(y0.dtype))
    dims = [d + 1 for d in dims_of(a.get("dim"), nd)]
    fn = torch.sum if op_name(op) == "sum" else torch.mean
    keep = a.get("keepdim", False)
    return each(x, lambda c: fn(c.to(y0.dtype), dims, keepdim=keep))


def shifted(s, op, args, kwargs, y0):
    """Ops with a ``dim`` argument: select, slice, index_select, cumsum, narrow, flip."""
    x = args[0]
    nd = x.primal.ndim
    a = bound(op, args, kwargs)
    name = next(iter(a))
    if op_name(op) == "flip":
        a["dims"] = [dim_of(d, nd) for d in a["dims"]]
    else:
        a["dim"] = dim_of(a["dim"], nd)

    def apply(c: torch.Tensor) -> torch.Tensor:
        a[name] = c.reshape(c.shape[0], 1) if nd == 0 else c
        return op(**a).reshape(c.shape[0], *y0.shape)

    return each(x, apply)


def indexed(s, op, args, kwargs, y0):
    return each(args[0], lambda c: torch.ops.aten.index.Tensor(c, [None, *args[1]]))


def gathered(s, op, args, kwargs, y0):
    nd, a = args[0].primal.ndim, bound(op, args, kwargs)
    idx = a["index"]
    return each(args[0], lambda c: torch.gather(c, dim_of(a["dim"], nd),
                                                idx.expand(c.shape[0], *idx.shape)))


def padded(s, op, args, kwargs, y0):
    return each(args[0], lambda c: torch.constant_pad_nd(c, args[1], 0.0))


def same_layout(s, op, args, kwargs, y0):
    """Ops on the last dims that accept a leading batch as is: tril, triu, neg."""
    return each(args[0], lambda c: op(c, *args[1:], **kwargs))


def repeated(s, op, args, kwargs, y0):
    sizes = list(args[1])
    return each(args[0], lambda c: lift(c, len(sizes)).repeat(1, *sizes))


def masked(s, op, args, kwargs, y0):
    if not isinstance(args[0], Jet) or isinstance(args[2], Jet):
        return NO_RULE
    return each(args[0], lambda c: c.masked_fill(args[1], 0.0))


def concatenated(s, op, args, kwargs, y0):
    parts = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    ref = next(p for p in parts if isinstance(p, Jet)).primal
    nd = ref.ndim + (1 if op_name(op) == "stack" else 0)
    out = []
    for k in range(1, s.order + 1):
        cs = [p[k].expand(s.size(k), *p[k].shape[1:]) if isinstance(p, Jet)
              else zeros(s, k, p) for p in parts]
        out.append(op(cs, dim_of(dim, nd)))
    return out


def split(s, op, args, kwargs, y0):
    """split / split_with_sizes / unbind / chunk: a tuple of jets."""
    a = bound(op, args, kwargs)
    name = next(iter(a))
    a["dim"] = dim_of(a["dim"], args[0].primal.ndim)
    per_k = []
    for c in args[0][1:]:
        a[name] = c
        per_k.append(op(**a))
    return tuple([pk[i] for pk in per_k] for i in range(len(y0)))


def broadcast_in_dim(s, op, args, kwargs, y0):
    """prims.broadcast_in_dim (left by a few decompositions): the direction axis stays first."""
    shape, dims = args[1], args[2]
    return each(args[0], lambda c: op(c, [c.shape[0], *shape], [0, *(d + 1 for d in dims)]))


def where(s, op, args, kwargs, y0):
    cond = args[0]
    out = []
    for k in range(1, s.order + 1):
        a = args[1][k] if isinstance(args[1], Jet) else None
        b = args[2][k] if isinstance(args[2], Jet) else None
        a = fit(a, y0.shape) if a is not None else 0.0
        b = fit(b, y0.shape) if b is not None else 0.0
        out.append(fit(torch.where(cond, a, b), y0.shape).clone())
    return out


def copied(s, op, args, kwargs, y0):
    if not isinstance(args[1], Jet):
        return CONSTANT
    return each(args[1], lambda c: fit(c.to(y0.dtype), y0.shape).contiguous())


def added(s, op, args, kwargs, y0):
    a, b = args[0], args[1]
    alpha = bound(op, args, kwargs).get("alpha", 1)
    sign = -1 if op_name(op) in ("sub", "rsub") else 1
    if op_name(op) == "rsub":
        a, b = b, a
    out = []
    for k in range(1, s.order + 1):
        ya = fit(a[k], y0.shape) if isinstance(a, Jet) else None
        yb = fit(b[k], y0.shape) * (sign * alpha) if isinstance(b, Jet) else None
        y = ser.add(ya, yb)
        out.append(y.to(y0.dtype) if y is ya else y)
    return out


def constant(s, op, args, kwargs, y0):
    """Piecewise constant or value-free ops: floor, sign, zeros_like, comparisons."""
    if op_name(op) == "fill" and isinstance(args[1], Jet):
        return NO_RULE
    return CONSTANT


def joint_linear(s, op, args, kwargs, y0):
    """Ops linear in all their floating tensor arguments jointly, by vmap over coefficients."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat, spec = tree_flatten((args, kwargs))
    where_jet = [i for i, a in enumerate(flat) if isinstance(a, Jet)]
    leaves = [torch.zeros_like(a) if isinstance(a, torch.Tensor) and a.is_floating_point()
              else a for a in flat]
    stacked = [torch.cat([c.expand(s.size(k), *c.shape[1:]) for k, c in enumerate(flat[i])
                          if k > 0]) for i in where_jet]

    def apply(*coeffs: torch.Tensor) -> torch.Tensor:
        mine = list(leaves)
        for i, c in zip(where_jet, coeffs, strict=True):
            mine[i] = c
        a, kw = tree_unflatten(mine, spec)
        return op(*a, **kw)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        try:
            out = torch.func.vmap(apply)(*stacked)
        except RuntimeError:  # no batching rule (as_strided_scatter): row by row
            out = torch.stack([apply(*(c[r] for c in stacked))
                               for r in range(stacked[0].shape[0])])
    if not isinstance(out, torch.Tensor):
        return NO_RULE
    return list(torch.split(out, [s.size(k) for k in range(1, s.order + 1)]))


# ---------------------------------------------------------------------------
# Products
# ---------------------------------------------------------------------------


def _product(s: Series, a: Any, b: Any, y0: torch.Tensor,
             prod: Callable, ndim: int | None = None) -> list:
    """Coefficients 1..K of ``prod(a, b)``, bilinear; jets or constants on either side."""
    if ndim is not None:
        a = Jet(lift(c, ndim) for c in a) if isinstance(a, Jet) else a
        b = Jet(lift(c, ndim) for c in b) if isinstance(b, Jet) else b
    if not isinstance(b, Jet):
        return [prod(c, b) for c in a[1:]]
    if not isinstance(a, Jet):
        return [prod(a, c) for c in b[1:]]
    return [ser.cauchy(s, a, b, k, prod) for k in range(1, s.order + 1)]


def multiplied(s, op, args, kwargs, y0):
    out = _product(s, args[0], args[1], y0, torch.mul, y0.ndim)
    return [fit(c, y0.shape).to(y0.dtype) for c in out]


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with the direction axis folded into the rows of one mm where it can be.

    (Left to itself, ``matmul`` of ``(n, m, k) @ (k, p)`` with a thin ``b`` took a
    batched path 25x slower than one ``(n m, k) @ (k, p)`` mm.)
    """
    if a.ndim == 3 and b.ndim == 2:
        return (a.reshape(-1, a.shape[-1]) @ b).reshape(a.shape[0], a.shape[1], b.shape[1])
    if a.ndim == 2 and b.ndim == 3:  # a @ b_r = (b_r^T a^T)^T
        return _mm(b.transpose(1, 2), a.T).transpose(1, 2)
    return torch.matmul(a, b)


def matmul(s, op, args, kwargs, y0):
    """mm, bmm, matmul: the direction axis is a batch axis of the product."""
    if op_name(op) == "matmul" and min(a.primal.ndim if isinstance(a, Jet) else a.ndim
                                       for a in args[:2]) < 2:
        return NO_RULE
    return _product(s, args[0], args[1], y0, _mm if op_name(op) == "mm" else torch.matmul)


def addmm(s, op, args, kwargs, y0):
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    out = _product(s, args[1], args[2], y0, _mm) if jets(args[1:3]) else \
        [None] * s.order
    if alpha != 1:
        out = [None if c is None else c * alpha for c in out]
    if isinstance(args[0], Jet):
        out = [ser.add(c, fit(b, y0.shape) * beta) for c, b in zip(out, args[0][1:],
                                                                   strict=True)]
    return [fit(c, y0.shape) for c in out]


def convolution(s, op, args, kwargs, y0):
    x, weight, bias = args[0], args[1], args[2]
    if not isinstance(x, Jet) or isinstance(weight, Jet) or isinstance(bias, Jet):
        return NO_RULE
    rest = args[3:]

    def conv(c: torch.Tensor) -> torch.Tensor:
        flat = c.reshape(-1, *c.shape[2:])
        y = op(flat, weight, None, *rest)
        return y.reshape(c.shape[0], *y0.shape)

    return each(x, conv)


def divided(s, op, args, kwargs, y0):
    if kwargs.get("rounding_mode") is not None:
        return CONSTANT
    a, b = args[0], args[1]
    if not isinstance(b, Jet):
        return [fit(lift(c, y0.ndim) / b, y0.shape) for c in a[1:]]
    nd = y0.ndim
    bl = [lift(c, nd) for c in b]
    al = [lift(c, nd) for c in a] if isinstance(a, Jet) else \
        [lift(torch.as_tensor(a, dtype=y0.dtype).unsqueeze(0), nd)] + [None] * s.order
    z = ser.divide(s, al, bl)
    return [fit(c, y0.shape) for c in z[1:]]


# ---------------------------------------------------------------------------
# Elementwise functions: Taylor coefficients of g at x0, then Faa di Bruno
# ---------------------------------------------------------------------------

_UNARY: dict[str, Callable[[torch.Tensor, int], list]] = {
    "exp": ser.exp_coeffs,
    "expm1": lambda x, k: [torch.expm1(x), *ser.exp_coeffs(x, k)[1:]],
    "exp2": lambda x, k: [c * math.log(2) ** i for i, c in
                          enumerate(ser.exp_coeffs(x * math.log(2), k))],
    "log": ser.log_coeffs,
    "log1p": lambda x, k: [torch.log1p(x), *ser.log_coeffs(1 + x, k)[1:]],
    "log2": lambda x, k: [c / math.log(2) for c in ser.log_coeffs(x, k)],
    "log10": lambda x, k: [c / math.log(10) for c in ser.log_coeffs(x, k)],
    "sin": ser.sin_coeffs,
    "cos": lambda x, k: ser.sin_coeffs(x, k, shift=1),
    "sinh": ser.sinh_coeffs,
    "cosh": lambda x, k: ser.sinh_coeffs(x, k, shift=1),
    "tanh": ser.tanh_coeffs,
    "tan": ser.tan_coeffs,
    "sigmoid": ser.sigmoid_coeffs,
    "erf": ser.erf_coeffs,
    "erfc": lambda x, k: [torch.erfc(x), *(-c for c in ser.erf_coeffs(x, k)[1:])],
    "atan": lambda x, k: ser.integrated(torch.atan(x), x, k, (1.0, 0.0, 1.0), -1.0),
    "asin": lambda x, k: ser.integrated(torch.asin(x), x, k, (1.0, 0.0, -1.0), -0.5),
    "acos": lambda x, k: [torch.acos(x), *(-c for c in ser.integrated(
        torch.asin(x), x, k, (1.0, 0.0, -1.0), -0.5)[1:])],
    "asinh": lambda x, k: ser.integrated(torch.asinh(x), x, k, (1.0, 0.0, 1.0), -0.5),
    "acosh": lambda x, k: ser.integrated(torch.acosh(x), x, k, (-1.0, 0.0, 1.0), -0.5),
    "atanh": lambda x, k: ser.integrated(torch.atanh(x), x, k, (1.0, 0.0, -1.0), -1.0),
    "sqrt": lambda x, k: ser.pow_coeffs(x, 0.5, k),
    "rsqrt": lambda x, k: ser.pow_coeffs(x, -0.5, k),
    "reciprocal": lambda x, k: ser.pow_coeffs(x, -1.0, k),
}


UNARY = frozenset(_UNARY)


def elementwise(s, op, args, kwargs, y0):
    x = args[0]
    d = _UNARY[op_name(op)](x[0], s.order)
    d[0] = y0.unsqueeze(0)
    return ser.compose(s, x, d, overwrite=s.overwrite)[1:]


def power(s, op, args, kwargs, y0):
    base, p = args[0], args[1]
    if isinstance(p, Jet):  # a^b = exp(b log a)
        if isinstance(base, Jet):
            loga = ser.compose(s, [lift(c, y0.ndim) for c in base],
                               ser.log_coeffs(lift(base[0], y0.ndim), s.order))
            e = [lift(c, y0.ndim) for c in p]
            arg = [e[0] * loga[0]] + [ser.cauchy(s, e, loga, k) for k in range(1, s.order + 1)]
        else:
            lb = torch.log(torch.as_tensor(base, dtype=y0.dtype))
            arg = [lift(c, y0.ndim) * lb for c in p]
        d = ser.exp_coeffs(arg[0], s.order)
        d[0] = y0.unsqueeze(0)
        return [fit(c, y0.shape) for c in ser.compose(s, arg, d)[1:]]
    x = [lift(c, y0.ndim) for c in base]
    d = ser.pow_coeffs(x[0], p, s.order)
    d[0] = y0.unsqueeze(0)
    return [fit(c, y0.shape) for c in ser.compose(s, x, d)[1:]]


# ---------------------------------------------------------------------------
# Non-smooth ops: the branch taken at x0
# ---------------------------------------------------------------------------

KINKS = frozenset(["relu", "abs", "maximum", "minimum", "fmax", "fmin", "clamp", "clamp_min",
                   "clamp_max", "amax", "amin", "max", "min", "where", "hardtanh",
                   "leaky_relu", "threshold"])


def _masked(x: Jet, mask: torch.Tensor, y0: torch.Tensor) -> list:
    m = mask.to(y0.dtype)
    return each(x, lambda c: fit(c * m, y0.shape))


def relu(s, op, args, kwargs, y0):
    return _masked(args[0], args[0].primal > 0, y0)


def absolute(s, op, args, kwargs, y0):
    return each(args[0], lambda c: c * torch.sgn(args[0].primal))


def clamped(s, op, args, kwargs, y0):
    """clamp with constant bounds: torch's mask ``lo <= x0 <= hi``."""
    x, lo, hi = args[0], *(list(args[1:]) + [None, None])[:2]
    if op_name(op) == "clamp_max":
        lo, hi = None, args[1]
    lo, hi = kwargs.get("min", lo), kwargs.get("max", hi)
    if isinstance(lo, Jet) or isinstance(hi, Jet):
        return NO_RULE
    mask = torch.ones_like(x.primal, dtype=torch.bool)
    if lo is not None:
        mask = mask & (x.primal >= lo)
    if hi is not None:
        mask = mask & (x.primal <= hi)
    return _masked(x, mask, y0)


def extremum(s, op, args, kwargs, y0):
    """maximum/minimum/fmax/fmin: the larger (smaller) side; ties share, as torch does."""
    a, b = args[0], args[1]
    pa = a.primal if isinstance(a, Jet) else a
    pb = b.primal if isinstance(b, Jet) else b
    big = op_name(op) in ("maximum", "fmax", "max")
    wins = (pa > pb) if big else (pa < pb)
    ties = pa == pb
    wa = torch.where(wins, 1.0, torch.where(ties, 0.5, 0.0)).to(y0.dtype)
    out = []
    for k in range(1, s.order + 1):
        ya = fit(a[k], y0.shape) * wa if isinstance(a, Jet) else None
        yb = fit(b[k], y0.shape) * (1 - wa) if isinstance(b, Jet) else None
        out.append(fit(ser.add(ya, yb), y0.shape))
    return out


def extreme_reduction(s, op, args, kwargs, y0):
    """amax/amin/max/min: the extremal entries, ties shared evenly (torch's forward mode)."""
    x = args[0]
    nd = x.primal.ndim
    if overload(op) == "dim":  # (values, indices): the entry at the index
        a = bound(op, args, kwargs)
        dim, keep = a["dim"], a.get("keepdim", False)
        idx = y0[1] if keep else y0[1].unsqueeze(dim % max(nd, 1))
        vals = gathered(s, torch.ops.aten.gather.default, [x, dim, idx], {}, None)
        if not keep and nd > 0:
            vals = [c.squeeze(dim_of(dim, nd)) for c in vals]
        return vals, CONSTANT
    if op_name(op) in ("max", "min") and overload(op) == "other":
        return extremum(s, op, args, kwargs, y0)
    if op_name(op) in ("max", "min") and overload(op) != "default":
        return NO_RULE
    a = bound(op, args, kwargs)
    dims = dims_of(a.get("dim"), nd)
    keep = a.get("keepdim", False)
    full = y0 if keep or nd == 0 else y0.reshape(
        [1 if i in dims else n for i, n in enumerate(x.primal.shape)])
    mask = (x.primal == full).to(y0.dtype)
    mask = mask / mask.sum(dims, keepdim=True) if nd else mask
    cd = [d + 1 for d in dims]
    return each(x, lambda c: (c * mask).sum(cd, keepdim=keep) if nd else c * mask)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

_FAMILIES: list[tuple[Rule, list[str]]] = [
    (reshaped, ["view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "alias", "clone",
                "contiguous", "lift_fresh_copy", "flatten", "view_copy", "squeeze_copy",
                "unsqueeze_copy", "alias_copy", "_reshape_alias", "reshape_as"]),
    (broadcast_in_dim, ["broadcast_in_dim"]),
    (expanded, ["expand", "expand_copy", "broadcast_to"]),
    (converted, ["_to_copy"]),
    (permuted, ["permute", "t", "transpose", "permute_copy", "t_copy", "transpose_copy"]),
    (reduced, ["sum", "mean"]),
    (shifted, ["select", "slice", "index_select", "cumsum", "narrow", "flip", "slice_copy",
               "select_copy"]),
    (indexed, ["index"]),
    (gathered, ["gather"]),
    (padded, ["constant_pad_nd"]),
    (same_layout, ["neg", "tril", "triu", "positive"]),
    (repeated, ["repeat"]),
    (masked, ["masked_fill"]),
    (concatenated, ["cat", "stack"]),
    (split, ["split", "split_with_sizes", "unbind", "chunk"]),
    (where, ["where"]),
    (copied, ["copy"]),
    (added, ["add", "sub", "rsub"]),
    (constant, ["floor", "ceil", "round", "trunc", "sign", "sgn", "detach", "zeros_like",
                "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty",
                "new_full", "fill", "floor_divide", "signbit", "bucketize", "searchsorted",
                "argmax", "argmin", "isnan", "isinf",
                "isfinite", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and",
                "logical_or", "logical_xor", "bitwise_not", "empty_strided"]),
    (joint_linear, ["slice_scatter", "select_scatter", "diagonal_scatter", "index_put",
                    "index_add", "index_copy", "scatter_add", "masked_scatter",
                    "as_strided_scatter", "diagonal", "diag_embed", "as_strided", "unfold",
                    "im2col", "col2im", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                    "upsample_nearest1d", "upsample_nearest2d", "upsample_linear1d",
                    "upsample_bilinear2d", "reflection_pad1d", "reflection_pad2d",
                    "replication_pad1d", "replication_pad2d", "roll", "_unsafe_index",
                    "embedding", "trace", "diag", "movedim", "swapaxes",
                    "_adaptive_avg_pool2d"]),
    (multiplied, ["mul"]),
    (matmul, ["mm", "bmm", "matmul"]),
    (addmm, ["addmm"]),
    (convolution, ["convolution"]),
    (divided, ["div"]),
    (elementwise, list(_UNARY)),
    (power, ["pow"]),
    (relu, ["relu"]),
    (absolute, ["abs"]),
    (clamped, ["clamp", "clamp_min", "clamp_max"]),
    (extremum, ["maximum", "minimum", "fmax", "fmin"]),
    (extreme_reduction, ["amax", "amin", "max", "min"]),
]

RULES: dict[str, Rule] = {name: rule for rule, names in _FAMILIES for name in names}


def rule_for(op: object) -> Rule | None:
    """The Taylor rule of an ATen op, or None (nested forward mode then)."""
    return RULES.get(op_name(op))


def has_rule(op: object) -> bool:
    return rule_for(op) is not None
