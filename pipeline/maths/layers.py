"""Per-layer pieces of a network's parameter Jacobian, never the whole ``J``.

For a ``Linear`` or ``Conv2d`` layer ``y_t = W a_t + b`` (``t`` over positions:
one for a plain ``Linear``, the output pixels of a convolution, whose ``a_t``
are the unfolded input patches) the Jacobian of output ``o`` with respect to
``W`` is ``sum_t g_ot a_tᵀ`` with ``g_ot = d out_o / d y_t``. A batch norm in
eval mode is a per-channel affine map ``y_tc = γ_c x̂_tc + β_c`` with
``x̂ = (x - mean) / sqrt(var + eps)`` from its running statistics: its
Jacobian is ``d out_o / d γ_c = sum_t g_otc x̂_tc``, ``d out_o / d β_c = sum_t g_otc``.
One backward pass per output (``vmap`` over ``O`` cotangents) gives every
layer's ``g``; the forward pass gives its ``a`` (or ``x̂``). :func:`features`
returns, per sample block,

- a :class:`Kron` per Linear / Conv2d layer: ``A`` ``(b, T, d_in)`` and ``G`` ``(b, O, T, d_out)``;
- one :class:`Dense` block ``(b, O, P_rest)``: the batch norms' columns, then
  every other parameter's (grouped convolutions, layer norms, ...).

NOTE: [One backward pass for the batch]
    When every parameter belongs to a Linear, Conv2d or eval-mode batch-norm
    layer, the block's samples go through the network as one batch and each
    output's cotangent is set for every sample at once: in eval mode the
    samples do not mix, so the cotangents ``g`` at each layer are the
    per-sample ones, and nothing per sample is summed over the batch (the
    parameters are not differentiated: zero probes added to the layers'
    outputs are). Any other parameter needs its own per-sample gradient, so
    a network with one is differentiated a sample at a time (``vmap``).

Products with ``J`` (kernels, sketches, ``J S Jᵀ``) are then sums over these
pieces, each at most one layer's share of ``J`` for a block of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
class NormInfo:
    """An eval-mode batch norm with a trainable scale or shift (module doc).

    Args:
        name: the module's name.
        weight, bias: the trainable parameters' names (None: frozen or absent).
        channels: ``C``.
        positions: ``T``, the positions per sample and channel.
        out_shape: the layer's output shape for one sample (batch dimension 1).
    """

    name: str
    weight: str | None
    bias: str | None
    channels: int
    positions: int
    out_shape: tuple[int, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n)

    @property
    def numel(self) -> int:
        return self.channels * len(self.names)


@dataclass(frozen=True)
class Network:
    """What :func:`analyse` learns from one sample: the structured layers and the rest.

    Args:
        layers: the ``Linear`` / ``Conv2d`` layers handled by their structure.
        rest: every other differentiated parameter's name (not a batch norm's).
        outputs: ``O``, outputs per sample.
        flops: multiply-adds of one forward pass of one sample (structured layers).
        norms: the eval-mode batch norms (their columns lead the :class:`Dense` block).
    """

    layers: tuple[LayerInfo, ...]
    rest: tuple[str, ...]
    outputs: int
    flops: int
    norms: tuple[NormInfo, ...] = ()

    @property
    def dense(self) -> tuple[str, ...]:
        """The :class:`Dense` block's parameters: the batch norms', then the rest."""
        return tuple(n for info in self.norms for n in info.names) + self.rest


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


def _norm(module: Any) -> bool:
    """A batch norm that is a fixed per-channel affine map: eval mode, running statistics."""
    from torch import nn

    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training
            and module.running_mean is not None and module.running_var is not None)


def analyse(fn: ModuleFunction, x: Tensor) -> Network:
    """Find the structured layers and their sizes by one forward pass of one sample."""
    trainable = set(fn.names)
    seen: dict[str, tuple[Any, Any]] = {}
    hooks = []
    for name, mod in fn.module.named_modules():
        prefix = f"{name}." if name else ""
        kron = _structured(mod) and f"{prefix}weight" in trainable
        norm = _norm(mod) and bool({f"{prefix}weight", f"{prefix}bias"} & trainable)
        if kron or norm:
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__(name, (i[0].shape, o.shape))))
    try:
        with torch.no_grad():
            out = fn(x.detach())
    finally:
        for h in hooks:
            h.remove()
    layers, norms, flops = [], [], 0
    modules = dict(fn.module.named_modules())
    for name, (_, out_shape) in seen.items():
        mod = modules[name]
        prefix = f"{name}." if name else ""
        weight, bias = (f"{prefix}{p}" if f"{prefix}{p}" in trainable else None
                        for p in ("weight", "bias"))
        if _norm(mod):
            c = int(out_shape[1])
            norms.append(NormInfo(name, weight, bias, c, int(torch.Size(out_shape[1:]).numel())
                                  // c, tuple(out_shape)))
            continue
        d_out, d_in = mod.weight.shape[0], mod.weight[0].numel()
        positions = int(torch.Size(out_shape[1:]).numel()) // d_out
        layers.append(LayerInfo(name, f"{prefix}weight", bias, d_in, d_out, positions,
                                tuple(out_shape)))
        flops += positions * d_in * d_out
    covered = {n for info in layers for n in (info.weight, info.bias) if n}
    covered |= {n for info in norms for n in info.names}
    rest = tuple(n for n in fn.names if n not in covered)
    return Network(tuple(layers), rest, int(out.numel()), flops, tuple(norms))


def patches(module: Any, a: Tensor) -> Tensor:
    """A layer's batch input as ``(B, T, d_in)``: a Linear's rows, a convolution's patches."""
    from torch import nn

    if isinstance(module, nn.Conv2d):
        cols = torch.nn.functional.unfold(a, module.kernel_size, module.dilation,
                                          module.padding, module.stride)
        return cols.transpose(1, 2)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _normalised(fn: ModuleFunction, name: str, x: Tensor) -> Tensor:
    """A batch norm's ``x̂`` of a batch input ``(B, C, ...)`` as ``(B, T, C)``."""
    prefix = f"{name}." if name else ""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = (fn.buffers[f"{prefix}{b}"].reshape(shape) for b in ("running_mean",
                                                                     "running_var"))
    eps = dict(fn.module.named_modules())[name].eps
    xhat = (x - mean) * torch.rsqrt(var + eps)
    return xhat.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)


def positions(module: Any, g: Tensor) -> Tensor:
    """A layer's output cotangents ``(O, B, ...)`` as ``(B, O, T, d_out)``."""
    from torch import nn

    o, b = g.shape[:2]
    if isinstance(module, nn.Linear):
        return g.reshape(o, b, -1, g.shape[-1]).transpose(0, 1)
    return g.reshape(o, b, g.shape[2], -1).permute(1, 0, 3, 2)  # channels second


def norm_columns(fn: ModuleFunction, info: NormInfo, x: Tensor, g: Tensor) -> Tensor:
    """A batch norm's Jacobian columns ``(b, O, C [+ C])`` (``γ``, then ``β``) from its input."""
    xhat = _normalised(fn, info.name, x)
    cols = []
    if info.weight:
        cols.append(torch.einsum("iotc,itc->ioc", g, xhat))
    if info.bias:
        cols.append(g.sum(2))
    return torch.cat(cols, dim=2)


def _probed(fn: ModuleFunction, net: Network) -> Callable[..., Any]:
    """``(x batch, probes, rest) -> (y (B, O), inputs)``: the network with zero probes added.

    The probes are zeros added to each layer's output (the Linear / Conv2d
    layers, then the batch norms) by a forward hook; their cotangents are the
    layers' ``g``. The hooks keep each layer's input: a convolution's is
    unfolded only when its pieces are formed.
    """
    modules = dict(fn.module.named_modules())
    mods = [modules[i.name] for i in net.layers] + [modules[i.name] for i in net.norms]
    params = fn.unflatten(fn.flat.detach())

    def f(x: Tensor, probes: list[Tensor], rest: dict[str, Tensor]) -> Any:
        inputs: list[Tensor] = [x] * len(mods)

        def hook(k: int) -> Any:
            def add(m: Any, i: Any, o: Tensor) -> Tensor:
                inputs[k] = i[0]
                return o + probes[k]
            return add

        handles = [m.register_forward_hook(hook(k)) for k, m in enumerate(mods)]
        try:
            state = {**fn.buffers, **params, **rest}
            y = torch.func.functional_call(fn.module, state, (x,))
        finally:
            for h in handles:
                h.remove()
        return y.reshape(x.shape[0], -1), inputs

    return f


def _pieces(fn: ModuleFunction, net: Network, inputs: list[Tensor], gs: list[Tensor]
            ) -> tuple[list[Kron], list[Tensor]]:
    """Krons and the batch norms' columns from layer inputs and cotangents ``(O, B, ...)``."""
    modules = dict(fn.module.named_modules())
    kron = [Kron(info, patches(modules[info.name], a), positions(modules[info.name], g))
            for info, a, g in zip(net.layers, inputs, gs, strict=False)]
    k = len(net.layers)
    norms = [norm_columns(fn, info, x,
                           positions(modules[info.name], g))
             for info, x, g in zip(net.norms, inputs[k:], gs[k:], strict=True)]
    return kron, norms


def batch_pass(fn: ModuleFunction, net: Network, xs: Tensor
               ) -> tuple[list[Tensor], Callable[..., list[Tensor]]]:
    """One forward pass of a batch (NOTE: [One backward pass for the batch]).

    Returns:
        the layers' batch inputs (Linear / Conv2d layers, then batch norms) and
        ``pull(cot, which=None, batched=False)``: cotangents of the outputs
        ``(B, O)`` (``batched``: ``(O', B, O)``) -> the output cotangents
        ``(B, *out)`` (``(O', B, *out)``) of the layers ``which`` (indices;
        None: all). The backward pass stops at the earliest layer asked for.
    """
    f = _probed(fn, net)
    # the probes: zero-strided views of one scalar, no memory of their own
    zero = fn.flat.new_zeros((), requires_grad=True)
    probes = [zero.expand(xs.shape[0], *i.out_shape[1:]) for i in (*net.layers, *net.norms)]
    with torch.enable_grad():
        y, inputs = f(xs.detach(), probes, {})

    def pull(cot: Tensor, which: list[int] | None = None, batched: bool = False
             ) -> list[Tensor]:
        wanted = probes if which is None else [probes[i] for i in which]
        return list(torch.autograd.grad(y, wanted, cot, retain_graph=True,
                                        is_grads_batched=batched))

    return [i.detach() for i in inputs], pull


def _sample_features(fn: ModuleFunction, net: Network, basis: Tensor) -> Any:
    """``x -> (A list, G list, norm columns, J_rest)`` of one sample (``vmap``-able)."""
    f = _probed(fn, net)
    params = fn.unflatten(fn.flat.detach())
    rest0 = {n: params[n] for n in net.rest}

    def sample(x: Tensor) -> Any:
        probes = [basis.new_zeros(i.out_shape) for i in (*net.layers, *net.norms)]
        _, pull, inputs = torch.func.vjp(lambda p, r: f(x.unsqueeze(0), p, r), probes, rest0,
                                         has_aux=True)
        g_probe, g_rest = torch.func.vmap(pull)(basis.unsqueeze(1))
        kron, norms = _pieces(fn, net, inputs, g_probe)
        o = basis.shape[0]
        rest = [g_rest[n].reshape(o, -1) for n in net.rest]
        return ([p.a[0] for p in kron], [p.g[0] for p in kron], [c[0] for c in norms],
                torch.cat(rest, dim=1) if rest else basis.new_zeros(o, 0))

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
    if net.rest:
        acts, gs, norms, rest = torch.func.vmap(_sample_features(fn, net, basis))(xs.detach())
        kron = [Kron(info, a, g) for info, a, g in zip(net.layers, acts, gs, strict=True)]
        dense = [*norms, rest]
    else:
        inputs, pull = batch_pass(fn, net, xs)
        cots = basis.unsqueeze(1).expand(basis.shape[0], xs.shape[0], net.outputs)
        kron, dense = _pieces(fn, net, inputs, pull(cots, batched=True))
    shapes = dict(zip(fn.names, fn.shapes, strict=True))
    jac = torch.cat(dense, dim=2) if dense else basis.new_zeros(xs.shape[0], basis.shape[0], 0)
    return [*kron, Dense(net.dense, jac, tuple(_numel(shapes[n]) for n in net.dense))]


def column_order(fn: ModuleFunction, net: Network) -> Tensor:
    """Where each piece's columns (in :func:`features`' order) sit among ``fn``'s columns."""
    offsets = {row["name"]: (row["offset"], row["offset"] + _numel(row["shape"]))
               for row in fn.layout()}
    names = [n for info in net.layers for n in (info.weight, info.bias) if n] + list(net.dense)
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
