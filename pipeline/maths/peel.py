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
    cotangent), then one of ``mv``, ``addmv``, ``mm``, ``addmm`` whose other
    operands do not reach ``x`` in the graph (a weight that requires grad as
    a module's parameter does is fine; ``x @ x`` is not). It returns the edge
    of the differentiable operand and a function that builds the cotangents
    of rows ``[a, b)`` for it directly (a copy of ``W``'s rows, or the rows
    of ``Wᵀ`` scattered into zeros for a matrix operand), so the backward
    starts one node lower. Anything else (an unknown node, a second path to
    ``x``, a saved tensor autograd freed) gives ``None``: the identity's
    rows as before.

    The cotangents are fresh copies: a custom ``backward`` may scale its
    ``grad_output`` in place, and ``fn``'s weights must not change. The
    rows are checked as every vectorised chunk's are: the vmap spot check
    compares a random combination of them with one plain
    ``torch.autograd.grad`` of the whole graph from ``y``, which the peel
    does not touch. Measured side by side (``python -m benchmarks.peers
    --dense-only``): mlp 1000 and mlp 2000 in about half ``jacrev``'s time.
"""

from __future__ import annotations

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


class Peel:
    """Where the backward of rows starts instead of ``y``, and their cotangents there."""

    def __init__(self, edge: GradientEdge, cotangents: Callable[[int, int], Tensor]) -> None:
        self.edge = edge
        self.cotangents = cotangents


def peel(y: Tensor, xg: Tensor) -> Peel | None:
    """The peeled start of ``y``'s rows (NOTE: [Rows whose last operation is a matrix
    product]), or ``None`` where ``y``'s graph does not end in a known matrix product."""
    node = y.grad_fn
    if node is None or xg.grad_fn is not None or getattr(y, "_backward_hooks", None):
        return None  # (a hook on y changes its cotangent: the whole graph runs)
    target = torch.autograd.graph.get_gradient_edge(xg).node
    scale = 1.0
    try:
        while True:
            name = type(node).__name__
            if name in _PASS_ON:
                node = _only(node.next_functions)
            elif name in ("AddBackward0", "SubBackward0"):
                found = _through_sum(node, name, target)
                if found is None:
                    return None
                node, factor = found
                scale *= factor
            else:
                break
            if node is None:
                return None
        return _product(node, y.numel(), scale, target)
    except (RuntimeError, AttributeError, TypeError):  # a freed or unknown saved tensor
        return None


def _only(edges: Any) -> Any:
    """The one input node of a single-input node, or None."""
    return edges[0][0] if len(edges) == 1 and edges[0][1] == 0 else None


def _through_sum(node: Any, name: str, target: Any) -> tuple[Any, float] | None:
    """``(input node, factor)`` of a sum with one term that reaches ``x``."""
    edges = node.next_functions
    live = _live(edges, range(len(edges)), target)
    if len(live) != 1 or edges[live[0]][1] != 0:  # (one output of a node with several)
        return None
    alpha = float(getattr(node, "_saved_alpha", 1))
    factor = 1.0 if live[0] == 0 else (alpha if name == "AddBackward0" else -alpha)
    return edges[live[0]][0], factor


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


def _product(node: Any, numel: int, scale: float, target: Any) -> Peel | None:
    """The peel at a matrix product node whose output has ``numel`` elements."""
    name = type(node).__name__
    edges = node.next_functions
    if name in ("MvBackward0", "AddmvBackward0"):
        vec = 1 if name == "MvBackward0" else 2
        if any(_reaches(edges[i][0], target) for i in range(len(edges)) if i != vec):
            return None
        w = node._saved_self if name == "MvBackward0" else node._saved_mat
        if name == "AddmvBackward0":
            scale *= float(node._saved_alpha)
        if w is None or w.dim() != 2 or w.shape[0] != numel:
            return None
        return Peel(_edge(edges[vec]), _rows_of(w.detach(), scale))
    if name in ("MmBackward0", "AddmmBackward0"):
        left, right = (0, 1) if name == "MmBackward0" else (1, 2)
        if name == "AddmmBackward0":
            if _reaches(edges[0][0], target):
                return None
            scale *= float(node._saved_alpha)
        live = _live(edges, (left, right), target)
        if len(live) != 1:
            return None
        first = "self" if name == "MmBackward0" else "mat1"
        if live[0] == left:  # y = h @ b: the cotangent of h for row (i, j) is b[:, j] in row i
            b = node._saved_mat2
            p = getattr(node, f"_saved_{first}_sym_sizes")[0]
            if b is None or b.dim() != 2 or p * b.shape[1] != numel:
                return None
            return Peel(_edge(edges[left]), _left_rows(b.detach(), int(p), b.shape[1], scale))
        a = getattr(node, f"_saved_{first}")  # y = a @ h: column j of its cotangent is a[i, :]
        q = node._saved_mat2_sym_sizes[1]
        if a is None or a.dim() != 2 or a.shape[0] * q != numel:
            return None
        return Peel(_edge(edges[right]), _right_rows(a.detach(), a.shape[0], int(q), scale))
    return None


def _edge(edge: tuple[Any, int]) -> GradientEdge:
    return GradientEdge(edge[0], edge[1])


def _rows_of(w: Tensor, scale: float) -> Callable[[int, int], Tensor]:
    def rows(a: int, b: int) -> Tensor:
        out = w[a:b].clone(memory_format=torch.contiguous_format)
        return out if scale == 1.0 else out.mul_(scale)

    return rows


def _left_rows(m: Tensor, p: int, q: int, scale: float) -> Callable[[int, int], Tensor]:
    """Cotangents of ``h`` in ``y = h @ m`` (``h`` is ``p x n``, ``m`` is ``n x q``)."""
    mt = m.T

    def rows(a: int, b: int) -> Tensor:
        r = torch.arange(a, b, device=m.device)
        out = m.new_zeros(b - a, p, m.shape[0])
        out[torch.arange(b - a, device=m.device), r // q] = mt[r % q]
        return out if scale == 1.0 else out.mul_(scale)

    return rows


def _right_rows(m: Tensor, p: int, q: int, scale: float) -> Callable[[int, int], Tensor]:
    """Cotangents of ``h`` in ``y = m @ h`` (``m`` is ``p x n``, ``h`` is ``n x q``)."""
    def rows(a: int, b: int) -> Tensor:
        r = torch.arange(a, b, device=m.device)
        out = m.new_zeros(b - a, m.shape[1], q)
        out[torch.arange(b - a, device=m.device), :, r % q] = m[r // q]
        return out if scale == 1.0 else out.mul_(scale)

    return rows
