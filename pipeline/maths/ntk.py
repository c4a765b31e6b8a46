"""The empirical neural tangent kernel ``K = J(x1) J(x2)ᵀ`` without ``J`` in memory.

Three ways, chosen by a cost estimate (multiply-adds) and reported:

- ``contraction``: per-sample parameter Jacobians of a block of samples
  (:mod:`pipeline.maths.params`), contracted block by block (the ``torch.func``
  tutorial's Jacobian contraction, in blocks);
- ``ntk-vp``: NTK-vector products (the tutorial's second recipe: one VJP at
  ``x1`` and one JVP at ``x2`` per output, per pair of samples), no ``J`` at all;
- ``structured``: per layer (:mod:`pipeline.maths.layers`). A ``Linear`` or
  ``Conv2d`` layer's share of ``K`` is ``sum_{t,s} (a1_t . a2_s) (g1_ot . g2_qs)``
  (its parameter Jacobian is ``sum_t g_t a_tᵀ``), computed from the layer's
  inputs ``a`` and output cotangents ``g`` without its ``d_out x d_in`` block
  per output; a layer where that costs more (many positions ``T``) forms its
  own block and contracts it; every other parameter is contracted explicitly.

NOTE: [Cost estimates]
    ``F`` is one sample's forward multiply-adds over the structured layers
    (at least ``P``). A backward pass costs ``F`` for the cotangents of the
    activations and ``F`` more for the weights' gradients; ``vmap`` over
    ``O`` cotangents costs ``O`` of them. Contraction: ``N F + N O 2F`` for
    the rows plus ``N1 N2 O² P`` (trace kernel: ``O P``). NTK-VP:
    ``N1 N2 O 5F`` (a VJP and a JVP per output per pair). Structured:
    ``N F + N O F`` (activations' cotangents only) plus, per layer, the
    cheaper of ``N1 N2 (T² d_in + T² O d_out + T O² d_out)`` (from ``a``, ``g``)
    and ``N O T d_in d_out + N1 N2 O² d_in d_out`` (its block formed: the
    weights' gradients). Symmetric kernels (``x2`` None) count half the pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from pipeline.core.errors import JacpipeError
from pipeline.maths.layers import Dense, Kron, Network, analyse, blocks, features
from pipeline.maths.params import param_rows

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.problem.module import ModuleFunction

NTK_METHODS = ("auto", "contraction", "ntk-vp", "structured")
KERNELS = ("full", "trace", "sum")


@dataclass(frozen=True)
class NTKReport:
    """How a kernel was computed.

    Args:
        method: the path taken (``contraction``, ``ntk-vp`` or ``structured``).
        estimates: each path's estimated multiply-adds (NOTE: [Cost estimates]).
        layers: structured path: each structured layer's way (``kron`` from
            ``a`` and ``g``, or ``explicit``: its block formed).
        block: samples per block.
        seconds: wall time.
    """

    method: str
    estimates: dict[str, float]
    layers: dict[str, str] = field(default_factory=dict)
    block: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        costs = ", ".join(f"{k} {v:.3g}" for k, v in sorted(self.estimates.items()))
        return (f"eNTK by {self.method} (estimated multiply-adds: {costs}); "
                f"{self.block} samples per block, {self.seconds:.3f}s")


def module_function(model: Any, dtype: Any) -> ModuleFunction:
    """``model`` (a module, a ``ModuleFunction`` or a ``params`` Problem) as a function."""
    from pipeline.problem.module import ModuleFunction

    fn = getattr(model, "fn", model)
    return fn if isinstance(fn, ModuleFunction) else ModuleFunction.of(model, dtype)


def _kron_costs(layer: Any, b1: int, b2: int, o: int, trace: bool) -> tuple[float, float]:
    """``(from a and g, block formed)`` multiply-adds of one layer over ``b1 x b2`` samples."""
    t, di, do = layer.positions, layer.d_in, layer.d_out
    oo = o if trace else o * o
    kron = b1 * b2 * (t * t * di + t * t * o * do + t * oo * do)
    explicit = (b1 + b2) * o * t * di * do + b1 * b2 * oo * di * do
    return float(kron), float(explicit)


def estimate(net: Network, p: int, n1: int, n2: int, *, trace: bool, symmetric: bool
             ) -> tuple[dict[str, float], dict[str, str]]:
    """Each path's estimated multiply-adds (NOTE: [Cost estimates]) and the layers' ways."""
    o = net.outputs
    f = float(max(net.flops, p))
    n = n1 if symmetric else n1 + n2
    pairs = n1 * n2 / (2 if symmetric else 1)
    oo = o if trace else o * o
    rows = n * o * 2 * f + n * f
    ways, structured = {}, n * o * f + n * f
    covered = 0
    for layer in net.layers:
        kron, explicit = _kron_costs(layer, n1, n2, o, trace)
        kron /= 2 if symmetric else 1
        ways[layer.name] = "kron" if kron <= explicit else "explicit"
        structured += min(kron, explicit)
        covered += layer.numel
    structured += pairs * oo * (p - covered)
    return {"contraction": rows + pairs * oo * p, "ntk-vp": pairs * o * 5 * f,
            "structured": structured}, ways


def _pair(f1: list[Any], f2: list[Any], trace: bool) -> Tensor:
    """One block of the kernel from two blocks' pieces: ``(b1, O, b2, O)`` or ``(b1, b2)``."""
    total = None
    for p1, p2 in zip(f1, f2, strict=True):
        part = _kron_pair(p1, p2, trace) if isinstance(p1, Kron) else _dense_pair(
            p1.explicit(), p2.explicit(), trace)
        total = part if total is None else total + part
    assert total is not None
    return total


def _dense_pair(j1: Tensor, j2: Tensor, trace: bool) -> Tensor:
    b1, o, p = j1.shape
    b2 = j2.shape[0]
    if trace:
        return torch.einsum("iop,jop->ij", j1, j2)
    return (j1.reshape(b1 * o, p) @ j2.reshape(b2 * o, p).T).reshape(b1, o, b2, o)


def _kron_pair(k1: Kron, k2: Kron, trace: bool) -> Tensor:
    """A structured layer's share: ``sum_{t,s} (a1_t . a2_s)(g1_ot . g2_qs)`` (+ its bias)."""
    aa = torch.einsum("itd,jsd->ijts", k1.a, k2.a)
    if trace:
        x = torch.einsum("ijts,josc->ijtoc", aa, k2.g)
        out = torch.einsum("iotc,ijtoc->ij", k1.g, x)
    else:
        x = torch.einsum("ijts,jqsc->ijtqc", aa, k2.g)
        out = torch.einsum("iotc,ijtqc->iojq", k1.g, x)
    if k1.info.bias is not None:
        out = out + _dense_pair(k1.g.sum(2), k2.g.sum(2), trace)
    return out


def _ntk_vp(fn: ModuleFunction, o: int, basis: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The tutorial's NTK-vector products for blocks: ``(x1, x2) -> (b1, b2, O', O)``."""
    flat = fn.flat.detach()

    def one(a: Tensor, b: Tensor) -> Tensor:
        _, pull = torch.func.vjp(lambda p: fn.call(p, a).reshape(-1), flat)

        def column(vec: Tensor) -> Tensor:
            (v,) = pull(vec)
            return torch.func.jvp(lambda p: fn.call(p, b).reshape(-1), (flat,), (v,))[1]

        return torch.func.vmap(column)(basis)

    del o
    return torch.func.vmap(torch.func.vmap(one, (None, 0)), (0, None))


def _per_sample_bytes(net: Network, method: str, ways: dict[str, str], p: int, o: int,
                      itemsize: int) -> int:
    """Bytes one sample's pieces hold on the chosen path (``ntk-vp``: one pair's vectors)."""
    if method != "structured":
        return o * p * itemsize
    total, covered = 0, 0
    for layer in net.layers:
        kron = layer.positions * (layer.d_in + o * layer.d_out)
        total += kron if ways[layer.name] == "kron" else o * layer.numel
        covered += layer.numel
    return (total + o * (p - covered)) * itemsize


def _pieces(fn: ModuleFunction, net: Network, method: str, ways: dict[str, str],
            basis: Tensor) -> Callable[[Tensor], list[Any]]:
    """``x block -> its pieces`` on a feature path (``contraction`` or ``structured``)."""
    def contraction(xb: Tensor) -> list[Any]:
        jac = param_rows(fn, xb, 0, xb.shape[0] * net.outputs).reshape(
            xb.shape[0], net.outputs, -1)
        return [Dense((), torch.einsum("qo,iop->iqp", basis, jac))]

    def structured(xb: Tensor) -> list[Any]:
        # every explicit column in one block: one product per pair of blocks, not one a layer
        out = features(fn, xb, net, basis)
        kron = [p for p in out if isinstance(p, Kron) and ways[p.info.name] == "kron"]
        dense = [p.explicit() for p in out if not any(p is k for k in kron)]
        return [*kron, Dense((), torch.cat(dense, dim=2))]

    return contraction if method == "contraction" else structured


def _by_blocks(pieces: Callable[[Tensor], list[Any]], x1: Tensor, x2: Tensor, out: Tensor, *,
               block: int, trace: bool, symmetric: bool, cache_bytes: int) -> None:
    """Fill ``out`` block by block; the second operand's pieces are kept while they fit."""
    cache: dict[int, list[Any]] = {}
    held = 0
    for a1, b1 in blocks(x1.shape[0], block):
        f1 = cache.pop(a1) if symmetric and a1 in cache else pieces(x1[a1:b1])
        for a2, b2 in blocks(x2.shape[0], block):
            if symmetric and a2 < a1:
                continue
            if symmetric and a2 == a1:
                f2 = f1
            elif a2 in cache:
                f2 = cache[a2]
            else:
                f2 = pieces(x2[a2:b2])
                size = sum(t.numel() * t.element_size() for p in f2 for t in _tensors(p))
                if held + size <= cache_bytes:
                    cache[a2], held = f2, held + size
            k = _pair(f1, f2, trace)
            _put(out, k, a1, b1, a2, b2, trace)
            if symmetric and a2 > a1:
                _put(out, k.permute(2, 3, 0, 1) if not trace else k.T, a2, b2, a1, b1, trace)


def _tensors(piece: Any) -> list[Tensor]:
    return [piece.a, piece.g] if isinstance(piece, Kron) else [piece.jac]


def _put(out: Tensor, k: Tensor, a1: int, b1: int, a2: int, b2: int, trace: bool) -> None:
    if trace:
        out[a1:b1, a2:b2] = k
    else:
        out[a1:b1, :, a2:b2, :] = k


def _by_pairs(fn: ModuleFunction, basis: Tensor, x1: Tensor, x2: Tensor, out: Tensor, *,
              block: int, kernel: str) -> None:
    """Fill ``out`` by NTK-vector products, one block of pairs at a time."""
    products = _ntk_vp(fn, basis.shape[1], basis)
    for a1, b1 in blocks(x1.shape[0], block):
        for a2, b2 in blocks(x2.shape[0], block):
            k = products(x1[a1:b1].detach(), x2[a2:b2].detach())  # (b1, b2, O', O)
            if kernel == "sum":
                k = k.sum(3)[:, :, 0]
            elif kernel == "trace":
                k = torch.diagonal(k, dim1=2, dim2=3).sum(2)
            else:
                k = k.permute(0, 2, 1, 3)
            _put(out, k, a1, b1, a2, b2, kernel != "full")


def ntk(model: Any, x1: Tensor, x2: Tensor | None = None, *, kernel: str = "full",
        method: str = "auto", block: int | None = None, memory_budget: int = 1 << 30,
        report: bool = False) -> Any:
    """The empirical NTK of ``model`` between the samples ``x1`` and ``x2``, in blocks of samples.

    Args:
        model: a ``torch.nn.Module`` mapping a batch to ``(B, *out)`` (batch
            norm in eval mode, no dropout in training mode), or
            ``Problem.from_module(...)`` / its ``fn``.
        x1, x2: samples ``(N1, *in)``, ``(N2, *in)``; ``x2`` None: ``x1`` (symmetric:
            half the blocks).
        kernel: ``full``: ``K`` of shape ``(N1 O, N2 O)``, entry
            ``(i O + o, j O + q) = J_o(x1_i) . J_q(x2_j)``; ``trace``: ``(N1, N2)``,
            the sum over ``o = q``; ``sum``: ``(N1, N2)``, the kernel of the sum of the outputs.
        method: ``auto`` (the cheapest by NOTE: [Cost estimates]), ``contraction``,
            ``ntk-vp`` or ``structured``.
        block: samples per block; None: from ``memory_budget`` (bytes).
        report: also return an :class:`NTKReport`.

    Returns:
        ``K`` (a tensor of the parameters' dtype and device), or ``(K, report)``.

    Raises:
        JacpipeError: an unknown kernel or method, or a module :meth:`Problem.from_module` refuses.
    """
    if kernel not in KERNELS or method not in NTK_METHODS:
        raise JacpipeError(f"ntk: kernel must be one of {KERNELS} and method one of "
                           f"{NTK_METHODS}, got kernel={kernel!r}, method={method!r}")
    t0 = time.perf_counter()
    fn = module_function(model, x1.dtype)
    symmetric = x2 is None
    x2 = x1 if x2 is None else x2
    net = analyse(fn, x1[0])
    o, p = net.outputs, fn.numel
    basis = (torch.ones(1, o, dtype=fn.flat.dtype, device=fn.flat.device) if kernel == "sum"
             else torch.eye(o, dtype=fn.flat.dtype, device=fn.flat.device))
    ob = basis.shape[0]
    est_net = replace(net, outputs=ob)
    estimates, ways = estimate(est_net, p, x1.shape[0], x2.shape[0], trace=kernel == "trace",
                               symmetric=symmetric)
    chosen = min(estimates, key=estimates.__getitem__) if method == "auto" else method
    itemsize = fn.flat.element_size()
    per = _per_sample_bytes(est_net, chosen, ways, p, ob, itemsize)
    if block is None:
        block = max(1, min(max(x1.shape[0], x2.shape[0]), memory_budget // (8 * per)))
        if chosen == "ntk-vp":
            block = max(1, int((memory_budget // (8 * per)) ** 0.5))
    full = kernel == "full"
    shape = (x1.shape[0], ob, x2.shape[0], ob) if full else (x1.shape[0], x2.shape[0])
    out = fn.flat.new_zeros(shape)
    if chosen == "ntk-vp":
        _by_pairs(fn, basis, x1, x2, out, block=block, kernel=kernel)
    else:
        _by_blocks(_pieces(fn, net, chosen, ways, basis), x1, x2, out, block=block,
                   trace=not full, symmetric=symmetric, cache_bytes=memory_budget // 4)
    k = out.reshape(x1.shape[0] * ob, x2.shape[0] * ob) if full else out
    if not report:
        return k
    taken = ways if chosen == "structured" else {}
    return k, NTKReport(chosen, estimates, taken, block, time.perf_counter() - t0)
