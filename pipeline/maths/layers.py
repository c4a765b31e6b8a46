"""Per-layer pieces of a network's parameter Jacobian, never the whole ``J``.

For a ``Linear`` or ``Conv2d`` layer ``y_t = W a_t + b`` (``t`` over positions:
one for a plain ``Linear``, the output pixels of a convolution, whose ``a_t``
are the unfolded input patches) the Jacobian of output ``o`` with respect to
``W`` is ``sum_t g_ot a_tᵀ`` with ``g_ot = d out_o / d y_t``. One backward pass
per output (``vmap`` over ``O`` cotangents) gives every layer's ``g``; the
forward pass gives its ``a``. :func:`features` returns, per sample block,

- a :class:`Kron` per such layer: ``A`` ``(b, T, d_in)`` and ``G`` ``(b, O, T, d_out)``;
- one :class:`Dense` block ``(b, O, P_rest)`` for every other parameter
  (batch-norm scales, grouped convolutions), by the same backward pass.

Products with ``J`` (kernels, sketches, ``J S Jᵀ``) are then sums over these
pieces, each at most one layer's share of ``J`` for a block of samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.problem.module import ModuleFunction


@dataclass(frozen=True)
class LayerInfo:
    """A ``Linear`` or ``Conv2d`` layer whose weight (and bias) are columns.

    Args:
        name: the module's name.
        weight, bias: the parameters' names (``bias`` None: no trainable bias).
        d_in, d_out: ``W``'s columns (``c_in k_h k_w`` for a convolution) and rows.
        positions: ``T``, the positions per sample (output pixels).
        out_shape: the layer's output shape for one sample (batch dimension 1).
    """

    name: str
    weight: str
    bias: str | None
    d_in: int
    d_out: int
    positions: int
    out_shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """The layer's columns: ``d_out d_in`` (+ ``d_out`` with a bias)."""
        return self.d_out * self.d_in + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class Network:
    """What :func:`analyse` learns from one sample: the structured layers and the rest.

    Args:
        layers: the ``Linear`` / ``Conv2d`` layers handled by their structure.
        rest: every other differentiated parameter's name.
        outputs: ``O``, outputs per sample.
        flops: multiply-adds of one forward pass of one sample (structured layers).
    """

    layers: tuple[LayerInfo, ...]
    rest: tuple[str, ...]
    outputs: int
    flops: int


@dataclass
class Kron:
    """One structured layer of a sample block: ``J_o = sum_t g_ot a_tᵀ`` (see module doc)."""

    info: LayerInfo
    a: Tensor  # (b, T, d_in)
    g: Tensor  # (b, O, T, d_out)

    def explicit(self) -> Tensor:
        """The layer's Jacobian block ``(b, O, d_out d_in [+ d_out])`` in parameter order."""
        b, o = self.g.shape[:2]
        w = torch.einsum("iotc,itd->iocd", self.g, self.a).reshape(b, o, -1)
        if self.info.bias is None:
            return w
        return torch.cat([w, self.g.sum(2)], dim=2)


@dataclass
class Dense:
    """Every other parameter of a sample block, as explicit Jacobian columns ``(b, O, P_rest)``."""

    names: tuple[str, ...]
    jac: Tensor
    sizes: tuple[int, ...] = ()

    def explicit(self) -> Tensor:
        return self.jac


def _structured(module: Any) -> bool:
    """A layer whose parameter Jacobian :class:`Kron` writes: plain Linear, zero-padded Conv2d."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def analyse(fn: ModuleFunction, x: Tensor) -> Network:
    """Find the structured layers and their sizes by one forward pass of one sample."""
    trainable = set(fn.names)
    seen: dict[str, tuple[Any, Any]] = {}
    hooks = []
    for name, mod in fn.module.named_modules():
        w = f"{name}.weight" if name else "weight"
        if _structured(mod) and w in trainable:
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__(name, (i[0].shape, o.shape))))
    try:
        with torch.no_grad():
            out = fn(x.detach())
    finally:
        for h in hooks:
            h.remove()
    layers, flops = [], 0
    modules = dict(fn.module.named_modules())
    for name, (_, out_shape) in seen.items():
        mod = modules[name]
        prefix = f"{name}." if name else ""
        d_out, d_in = mod.weight.shape[0], mod.weight[0].numel()
        positions = int(torch.Size(out_shape[1:]).numel()) // d_out
        bias = f"{prefix}bias" if f"{prefix}bias" in trainable else None
        layers.append(LayerInfo(name, f"{prefix}weight", bias, d_in, d_out, positions,
                                tuple(out_shape)))
        flops += positions * d_in * d_out
    covered = {n for info in layers for n in (info.weight, info.bias) if n}
    rest = tuple(n for n in fn.names if n not in covered)
    return Network(tuple(layers), rest, int(out.numel()), flops)


def _patches(module: Any, a: Tensor) -> Tensor:
    """A layer's input as ``(T, d_in)``: a Linear's rows, a convolution's unfolded patches."""
    from torch import nn

    if isinstance(module, nn.Conv2d):
        cols = torch.nn.functional.unfold(a, module.kernel_size, module.dilation,
                                          module.padding, module.stride)
        return cols[0].transpose(0, 1)
    return a.reshape(-1, a.shape[-1])


def _positions(module: Any, g: Tensor) -> Tensor:
    """A layer's output cotangents ``(O, 1, ...)`` as ``(O, T, d_out)``."""
    from torch import nn

    o = g.shape[0]
    if isinstance(module, nn.Conv2d):  # (O, 1, c_out, H, W) -> (O, H W, c_out)
        return g.reshape(o, g.shape[2], -1).transpose(1, 2)
    return g.reshape(o, -1, g.shape[-1])


def _sample_features(fn: ModuleFunction, net: Network, basis: Tensor) -> Any:
    """``x -> (A list, G list, J_rest)`` of one sample (``vmap``-able over samples).

    The probes are zeros added to each structured layer's output by a forward
    hook; their cotangents are the layers' ``g``. The rest of the parameters
    are differentiated as arguments of the same backward pass.
    """
    modules = dict(fn.module.named_modules())
    mods = [modules[info.name] for info in net.layers]
    params = fn.unflatten(fn.flat.detach())
    rest0 = {n: params[n] for n in net.rest}

    def sample(x: Tensor) -> Any:
        def f(probes: list[Tensor], rest: dict[str, Tensor]) -> Any:
            acts: list[Tensor] = []

            def hook(k: int) -> Any:
                def add(m: Any, i: Any, o: Tensor) -> Tensor:
                    acts.append(_patches(m, i[0]))
                    return o + probes[k]
                return add

            handles = [m.register_forward_hook(hook(k)) for k, m in enumerate(mods)]
            try:
                state = {**fn.buffers, **params, **rest}
                y = torch.func.functional_call(fn.module, state, (x.unsqueeze(0),))
            finally:
                for h in handles:
                    h.remove()
            return y.reshape(-1), acts

        probes = [basis.new_zeros(info.out_shape) for info in net.layers]
        _, pull, acts = torch.func.vjp(f, probes, rest0, has_aux=True)
        g_probe, g_rest = torch.func.vmap(pull)(basis)
        gs = [_positions(m, g) for m, g in zip(mods, g_probe, strict=True)]
        o = basis.shape[0]
        rest = (torch.cat([g_rest[n].reshape(o, -1) for n in net.rest], dim=1)
                if net.rest else basis.new_zeros(o, 0))
        return acts, gs, rest

    return sample


def features(fn: ModuleFunction, xs: Tensor, net: Network, basis: Tensor | None = None
             ) -> list[Kron | Dense]:
    """Every layer's piece of ``J`` for the samples ``xs``: Krons, then one Dense.

    Args:
        fn: the module function.
        xs: a block of samples ``(b, *in_shape)``.
        net: :func:`analyse`'s answer.
        basis: the output cotangents ``(O', O)``; ``None``: the identity (every
            output), ones ``(1, O)``: the sum of the outputs.
    """
    if basis is None:
        basis = torch.eye(net.outputs, dtype=fn.flat.dtype, device=fn.flat.device)
    acts, gs, rest = torch.func.vmap(_sample_features(fn, net, basis))(xs.detach())
    out: list[Kron | Dense] = [Kron(info, a, g)
                               for info, a, g in zip(net.layers, acts, gs, strict=True)]
    shapes = dict(zip(fn.names, fn.shapes, strict=True))
    out.append(Dense(net.rest, rest, tuple(_numel(shapes[n]) for n in net.rest)))
    return out


def column_order(fn: ModuleFunction, net: Network) -> Tensor:
    """Where each piece's columns (in :func:`features`' order) sit among ``fn``'s columns."""
    offsets = {row["name"]: (row["offset"], row["offset"] + _numel(row["shape"]))
               for row in fn.layout()}
    names = [n for info in net.layers for n in (info.weight, info.bias) if n] + list(net.rest)
    return torch.cat([torch.arange(*offsets[n]) for n in names])


def _numel(shape: Any) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``[a, b)`` sample blocks of at most ``size``."""
    for a in range(0, n, max(size, 1)):
        yield a, min(a + max(size, 1), n)
