"""Reverse-mode rows that skip the product of the identity with a last linear layer.

NOTE: [Rows whose last operation is a matrix product]
    Reverse mode pulls the rows ``e_r`` of the identity back through ``fn``'s
    graph, one VJP per row, vectorised. When ``fn`` ends in a matrix product
    with a matrix that does not depend on ``x`` (``W @ h``, ``addmv``,
    ``F.linear`` / ``nn.Linear``, ``h @ W.T``, each perhaps followed by a bias
    added, a reshape, or both), the first backward step multiplies the
    identity by ``W``: for ``y = W @ h`` the cotangent of ``h`` for row ``r``
    is ``Wᵀ e_r``, row ``r`` of ``W``. Computing it with the identity is a
    full ``(k x m) @ (m x n_h)`` product whose answer is a slice of ``W``.
    ``torch.func.jacrev`` pays it; on a two-layer perceptron it is half the
    work (mlp 1000: two products of equal size).

    :func:`peel` reads the recorded graph from ``y`` downwards: nodes that
    pass the cotangent on unchanged in flat order (a reshape, a bias or any
    term that does not depend on ``x`` added or subtracted, as long as the
    element count stays that of ``y``: a broadcast that grew it would sum the
    cotangent); elementwise nodes, whose backward multiplies the cotangent
    by a vector ``d`` that does not depend on it (``tanh``, ``relu``, a
    constant factor...: ``d`` is the node's own backward applied to ones, so
    row ``r`` is scaled by ``d[r]``); then one of ``mv``, ``addmv``, ``mm``,
    ``addmm`` whose other operands do not reach ``x`` in the graph (a weight
    that requires grad as a module's parameter does is fine; ``x @ x`` is
    not). It returns the edge of the differentiable operand and a function
    that builds the cotangents of rows ``[a, b)`` for it directly (``W``'s
    rows scaled, or the rows of ``Wᵀ`` scattered into zeros for a matrix
    operand), so the backward starts below the product. Anything else (an
    unknown node, a second path to ``x``, a saved tensor autograd freed) gives
    ``None``: the identity's rows as before. So does a weight or a ``d``
    with an inf or nan: the identity's rows have nan there (``0 * inf``), and
    so does ``torch.autograd.functional.jacobian``.

    The cotangents are fresh copies: a custom ``backward`` may scale its
    ``grad_output`` in place, and ``fn``'s weights must not change. Hooks
    on the part of the graph the peel skips (a tensor hook on an
    intermediate, a node's pre-hook, a legacy module backward hook) are
    invisible to the walk: torch does not list them. So each call first
    has autograd run that part itself for one random combination of all
    rows and compares (NOTE: [A peel checked by the graph it skips] in
    :mod:`pipeline.maths.engine`); a difference means the identity's rows.
    The rows are then checked as every vectorised chunk's are: the vmap
    spot check compares a random combination of them with one plain
    ``torch.autograd.grad`` of the whole graph from ``y``. Measured side by
    side (``python -m benchmarks.peers --dense-only``, this session's runs):
    mlp 1000 and mlp 2000 in 0.52-0.68x ``jacrev``'s time, a ``(30, 40) ->
    (30, 50)`` ``tanh(x @ W)`` in 0.33-0.38x.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

#: Nodes visited at most when asking whether a weight's graph reaches ``x``.
MAX_WALK = 4096

#: One-input nodes whose backward hands the cotangent on in flat order: reshapes,
#: and a scalar added or subtracted.
_PASS_ON = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                      "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
                      "UnsqueezeBackward0", "AddBackward1", "SubBackward1"})

#: Elementwise nodes whose backward multiplies the cotangent by a vector that does
#: not depend on it: ``d = node(ones)`` (``f'(h)``, or the other factor).
_DIAGONAL = frozenset({
    "TanhBackward0", "SigmoidBackward0", "ExpBackward0", "Exp2Backward0", "Expm1Backward0",
    "SinBackward0", "CosBackward0", "SinhBackward0", "CoshBackward0", "AtanBackward0",
    "AsinhBackward0", "ErfBackward0", "ReluBackward0", "SoftplusBackward0", "GeluBackward0",
    "SiluBackward0", "EluBackward0", "LeakyReluBackward0", "HardtanhBackward0",
    "ClampBackward1", "LogBackward0", "Log1pBackward0", "SqrtBackward0", "RsqrtBackward0",
    "ReciprocalBackward0", "NegBackward0", "PowBackward0", "MulBackward0", "DivBackward0"})


class Peel:
    """Where the backward of rows starts instead of ``y``, and their cotangents there.

    ``cotangents(a, b)``: rows ``[a, b)``'s cotangents at ``edge``;
    ``combine(c)``: ``sum_r c[r] cotangents(r)`` for a flat ``c`` over all of
    ``y`` (one product, no rows built); ``bound``: a bound on the Frobenius
    norm of all rows' cotangents together (``|combine(c)| <= |c| bound``).
    """

    def __init__(self, edge: GradientEdge, cotangents: Callable[[int, int], Tensor],
                 combine: Callable[[Tensor], Tensor], bound: float) -> None:
        self.edge = edge
        self.cotangents = cotangents
        self.combine = combine
        self.bound = bound


class _Scale:
    """What the cotangent of flat row ``r`` is multiplied by on the way down: a number
    times, where an elementwise node was passed, ``diag[r]``."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.factor = 1.0
        self.diag: Tensor | None = None

    def times(self, d: Tensor) -> bool:
        """Multiply by the flat vector ``d``; False where it is not one entry per row."""
        d = d.detach().reshape(-1)
        if d.numel() != self.numel:
            return False
        self.diag = d if self.diag is None else self.diag * d
        return True

    def rows(self, a: int, b: int, like: Tensor) -> Tensor | None:
        """Rows ``[a, b)``'s multipliers as a ``(b - a, 1)`` column, or None (all 1)."""
        if self.diag is None:
            return None
        return self.diag[a:b].to(like.dtype).mul(self.factor).unsqueeze(1)

    def weighted(self, c: Tensor, like: Tensor) -> Tensor:
        """``c`` (flat, one weight per row) times every row's multiplier."""
        c = c.to(like.dtype) * self.factor
        return c if self.diag is None else c * self.diag.to(like.dtype)

    def largest(self) -> float:
        """The largest multiplier's size (inf for an inf ``alpha``: :func:`peel` refuses
        a peel whose bound is not finite)."""
        d = 1.0 if self.diag is None else float(self.diag.abs().max()) if self.numel else 0.0
        return abs(self.factor) * d


def peel(y: Tensor, xg: Tensor) -> Peel | None:
    """The peeled start of ``y``'s rows (NOTE: [Rows whose last operation is a matrix
    product]), or ``None`` where ``y``'s graph does not end in a known matrix product."""
    node = y.grad_fn
    if node is None or xg.grad_fn is not None or getattr(y, "_backward_hooks", None):
        return None  # (a hook on y changes its cotangent: the whole graph runs)
    target = torch.autograd.graph.get_gradient_edge(xg).node
    scale = _Scale(y.numel())
    try:
        with torch.no_grad():
            while node is not None:
                name = type(node).__name__
                if name in _PASS_ON:
                    node = _only(node.next_functions)
                elif name in ("AddBackward0", "SubBackward0"):
                    node = _through_sum(node, name, target, scale)
                elif name in _DIAGONAL:
                    node = _through_diagonal(node, target, scale)
                else:
                    found = _product(node, scale, target)
                    # (an inf alpha: 0 * inf in the identity's rows)
                    return found if found is None or math.isfinite(found.bound) else None
    except (RuntimeError, AttributeError, TypeError, IndexError):  # a freed saved tensor
        return None
    return None


def _only(edges: Any) -> Any:
    """The one input node of a single-input node, or None."""
    return edges[0][0] if len(edges) == 1 and edges[0][1] == 0 else None


def _through_sum(node: Any, name: str, target: Any, scale: _Scale) -> Any:
    """The input node of a sum with one term that reaches ``x`` (its factor into
    ``scale``), or None."""
    edges = node.next_functions
    live = _live(edges, range(len(edges)), target)
    if len(live) != 1 or edges[live[0]][1] != 0:  # (one output of a node with several)
        return None
    alpha = float(getattr(node, "_saved_alpha", 1))
    scale.factor *= 1.0 if live[0] == 0 else (alpha if name == "AddBackward0" else -alpha)
    return edges[live[0]][0]


def _through_diagonal(node: Any, target: Any, scale: _Scale) -> Any:
    """The input node of an elementwise node with one input that reaches ``x`` (its
    derivative, finite, into ``scale``), or None."""
    edges = node.next_functions
    live = _live(edges, range(len(edges)), target)
    meta = node._input_metadata
    if len(live) != 1 or edges[live[0]][1] != 0 or len(meta) != 1:
        return None
    ones = torch.ones(meta[0].shape, dtype=meta[0].dtype, device=meta[0].device)
    d = node(ones)
    d = d[live[0]] if isinstance(d, tuple) else d
    if d is None or _norm(d) is None or not scale.times(d):
        return None  # (a non-finite derivative: 0 * inf in the identity's rows is nan)
    return edges[live[0]][0]


def _live(edges: Any, among: Any, target: Any) -> list[int]:
    """The inputs among ``among`` that reach ``target`` (a lone non-None one is taken as
    live without walking it: it is the rest of ``fn``'s graph)."""
    present = [i for i in among if edges[i][0] is not None]
    if len(present) <= 1:
        return present
    return [i for i in present if _reaches(edges[i][0], target)]


def _reaches(node: Any, target: Any) -> bool:
    """Whether ``target`` is below ``node``; True where the walk is too long to tell."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        if n is target:
            return True
        seen.add(id(n))
        if len(seen) > MAX_WALK:
            return True
        stack.extend(m for m, _ in n.next_functions)
    return False


def _product(node: Any, scale: _Scale, target: Any) -> Peel | None:
    """The peel at a matrix product node whose output has ``scale.numel`` elements."""
    name = type(node).__name__
    edges = node.next_functions
    numel = scale.numel
    if name in ("MvBackward0", "AddmvBackward0"):
        vec = 1 if name == "MvBackward0" else 2
        if any(_reaches(edges[i][0], target) for i in range(len(edges)) if i != vec):
            return None
        w = node._saved_self if name == "MvBackward0" else node._saved_mat
        if name == "AddmvBackward0":
            scale.factor *= float(node._saved_alpha)
        norm = _norm(w)
        if w is None or w.dim() != 2 or w.shape[0] != numel or norm is None:
            return None
        w = w.detach()
        return Peel(_edge(edges[vec]), _rows_of(w, scale),
                    lambda c: w.T @ scale.weighted(c, w), norm * scale.largest())
    if name in ("MmBackward0", "AddmmBackward0"):
        left, right = (0, 1) if name == "MmBackward0" else (1, 2)
        if name == "AddmmBackward0":
            if _reaches(edges[0][0], target):
                return None
            scale.factor *= float(node._saved_alpha)
        live = _live(edges, (left, right), target)
        if len(live) != 1:
            return None
        first = "self" if name == "MmBackward0" else "mat1"
        if live[0] == left:  # y = h @ b: the cotangent of h for row (i, j) is b[:, j] in row i
            b = node._saved_mat2
            p = int(getattr(node, f"_saved_{first}_sym_sizes")[0])
            norm = _norm(b)
            if b is None or b.dim() != 2 or p * b.shape[1] != numel or norm is None:
                return None
            b = b.detach()
            return Peel(_edge(edges[left]), _left_rows(b, p, scale),
                        lambda c: scale.weighted(c, b).reshape(p, -1) @ b.T,
                        norm * math.sqrt(p) * scale.largest())
        a = getattr(node, f"_saved_{first}")  # y = a @ h: column j of its cotangent is a[i, :]
        q = int(node._saved_mat2_sym_sizes[1])
        norm = _norm(a)
        if a is None or a.dim() != 2 or a.shape[0] * q != numel or norm is None:
            return None
        a = a.detach()
        return Peel(_edge(edges[right]), _right_rows(a, q, scale),
                    lambda c: a.T @ scale.weighted(c, a).reshape(-1, q),
                    norm * math.sqrt(q) * scale.largest())
    return None


def _norm(w: Tensor | None) -> float | None:
    """``w``'s Frobenius norm, or None where ``w`` has an inf or nan (the identity's rows
    have nan there: 0 * inf).

    The norm is inf or nan wherever an entry is (and, rarely, where finite
    entries overflow: then no peel, which is safe); ``isfinite(w).all()`` took
    10x a sum's time (0.33 ms on mlp 200's 200 x 512 weight).
    """
    if w is None:
        return None
    norm = float(torch.linalg.vector_norm(w.detach()))  # (in w's dtype: 4x faster than float64)
    return norm if math.isfinite(norm) else None


def _edge(edge: tuple[Any, int]) -> GradientEdge:
    return GradientEdge(edge[0], edge[1])


def _rows_of(w: Tensor, scale: _Scale) -> Callable[[int, int], Tensor]:
    """Cotangents of ``h`` in ``y = w @ h``: rows of ``w``."""
    def rows(a: int, b: int) -> Tensor:
        d = scale.rows(a, b, w)
        if d is not None:
            return w[a:b] * d
        out = w[a:b].clone(memory_format=torch.contiguous_format)
        return out if scale.factor == 1.0 else out.mul_(scale.factor)

    return rows


def _left_rows(m: Tensor, p: int, scale: _Scale) -> Callable[[int, int], Tensor]:
    """Cotangents of ``h`` in ``y = h @ m`` (``h`` is ``p x n``, ``m`` is ``n x q``)."""
    mt, q = m.T, m.shape[1]

    def rows(a: int, b: int) -> Tensor:
        r = torch.arange(a, b, device=m.device)
        out = m.new_zeros(b - a, p, m.shape[0])
        d = scale.rows(a, b, m)
        out[torch.arange(b - a, device=m.device), r // q] = (
            mt[r % q] if d is None else mt[r % q] * d)
        return out if d is not None or scale.factor == 1.0 else out.mul_(scale.factor)

    return rows


def _right_rows(m: Tensor, q: int, scale: _Scale) -> Callable[[int, int], Tensor]:
    """Cotangents of ``h`` in ``y = m @ h`` (``m`` is ``p x n``, ``h`` is ``n x q``)."""
    def rows(a: int, b: int) -> Tensor:
        r = torch.arange(a, b, device=m.device)
        out = m.new_zeros(b - a, m.shape[1], q)
        d = scale.rows(a, b, m)
        out[torch.arange(b - a, device=m.device), :, r % q] = (
            m[r // q] if d is None else m[r // q] * d)
        return out if d is not None or scale.factor == 1.0 else out.mul_(scale.factor)

    return rows
