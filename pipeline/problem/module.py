"""A network as a function of its parameters: the ``fn`` of ``Problem.from_module``.

A :class:`ModuleFunction` holds a ``torch.nn.Module``, a snapshot of its
parameters as one flat vector (the columns of a ``params`` result) and of its
buffers (constants: never differentiated). Every call goes through
``torch.func.functional_call`` with that snapshot, so a later change to the
module's own weights does not change the problem, and the object pickles (Ray
ships it to workers; its fingerprint names every parameter and hashes the
snapshot).

NOTE: [train and eval]
    A per-sample Jacobian is defined only when a sample's output depends on
    that sample alone, and deterministically: batch norm in training mode
    mixes the samples of a batch (and updates its running statistics) and
    dropout draws noise. A module holding such layers in training mode is
    refused with the fix (``model.eval()``); other modules' mode does not
    matter and is left as the caller set it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import JacpipeError

if TYPE_CHECKING:
    from torch import Tensor, nn


def _mode_sensitive(module: Any) -> bool:
    """Layers whose output in training mode is not a per-sample function (NOTE above)."""
    from torch import nn

    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    if isinstance(module, norms):
        return bool(module.track_running_stats) or isinstance(
            module, nn.modules.batchnorm._BatchNorm)
    return isinstance(module, nn.modules.dropout._DropoutNd)


@dataclass(frozen=True, eq=False)
class ModuleFunction:
    """``model`` as a function of one sample and of its flattened parameters.

    Args:
        module: the network; it maps a batch ``(B, *in_shape)`` to ``(B, *out_shape)``.
        names: the differentiated parameters' names (``module.named_parameters()``
            order, those with ``requires_grad``).
        shapes: their shapes.
        flat: their values, concatenated (``P`` entries), detached.
        buffers: the buffers and frozen parameters, detached (constants).
    """

    module: nn.Module
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    flat: Tensor
    buffers: dict[str, Tensor]

    @classmethod
    def of(cls, model: nn.Module, dtype: Any = None) -> ModuleFunction:
        """Snapshot ``model``'s parameters and buffers.

        Raises:
            JacpipeError: not a module, no parameter to differentiate, a layer
                whose training mode couples samples (NOTE: [train and eval]),
                or parameters of another dtype than the inputs'.
        """
        import torch

        if not isinstance(model, torch.nn.Module):
            raise JacpipeError(f"from_module: expected a torch.nn.Module, got "
                               f"{type(model).__name__}")
        bad = [name or type(model).__name__ for name, sub in model.named_modules()
               if sub.training and _mode_sensitive(sub)]
        if bad:
            raise JacpipeError(
                f"from_module: {', '.join(bad[:3])} {'is' if len(bad) == 1 else 'are'} in "
                "training mode (batch norm mixes the samples of a batch, dropout draws noise), "
                "so per-sample Jacobians are undefined; call model.eval() first")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise JacpipeError("from_module: the model has no parameter with requires_grad; "
                               "there is nothing to differentiate")
        dtypes = {p.dtype for _, p in named}
        if dtype is not None and dtypes != {dtype}:
            raise JacpipeError(
                f"from_module: parameters are {sorted(map(str, dtypes))} but the inputs are "
                f"{dtype}; convert one of them (model.to(inputs.dtype) or inputs.to(...))")
        frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        flat = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        return cls(model, tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named),
                   flat, {**frozen, **buffers})

    @property
    def numel(self) -> int:
        """``P``: the number of differentiated parameters (the columns)."""
        return int(self.flat.numel())

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``{name: view of flat}`` in the module's shapes."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = 1
            for s in shape:
                size *= int(s)
            out[name] = flat[offset:offset + size].view(shape)
            offset += size
        return out

    def call(self, flat: Tensor, x: Tensor) -> Tensor:
        """The model's output at one sample ``x`` with parameters ``flat``."""
        return self.call_state(self.unflatten(flat), x)

    def call_state(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The model's output at one sample ``x`` with parameters ``{name: tensor}``."""
        import torch

        state = {**self.buffers, **params}
        return torch.func.functional_call(self.module, state, (x.unsqueeze(0),)).squeeze(0)

    def call_batch(self, flat: Tensor, xs: Tensor) -> Tensor:
        """The model's outputs at a batch ``xs`` with parameters ``flat``."""
        import torch

        state = {**self.buffers, **self.unflatten(flat)}
        return torch.func.functional_call(self.module, state, (xs,))

    def __call__(self, x: Tensor) -> Tensor:
        """The model's output at one sample (its snapshot's parameters)."""
        return self.call(self.flat, x)

    def of_parameters(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """``flat -> model output at x``: the function whose Jacobian a row block is."""
        return lambda flat: self.call(flat, x)

    def layout(self) -> list[dict[str, Any]]:
        """Each parameter's ``name``, ``shape`` and ``offset`` among the columns."""
        rows, offset = [], 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = 1
            for s in shape:
                size *= int(s)
            rows.append({"name": name, "shape": list(shape), "offset": offset})
            offset += size
        return rows

    def facts(self) -> dict[str, Any]:
        """What the fingerprint records: the layout and a hash of the values and buffers."""
        digest = hashlib.sha256(self.flat.detach().cpu().contiguous().numpy().tobytes())
        for name in sorted(self.buffers):
            b = self.buffers[name].detach().cpu().contiguous()
            digest.update(name.encode() + b.numpy().tobytes())
        return {"layout": self.layout(), "sha256": digest.hexdigest(),
                "module": type(self.module).__name__}


def parameter_columns(fn: Any, spec: str) -> int:
    """``P`` of a ``params`` problem's ``fn``.

    Raises:
        JacpipeError: ``fn`` is not a :class:`ModuleFunction`.
    """
    if not isinstance(fn, ModuleFunction):
        raise JacpipeError(f"{spec}: kind 'params' differentiates a module's parameters; build "
                           "it with Problem.from_module(model, inputs)")
    return fn.numel
