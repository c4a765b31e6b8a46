"""The derivative kinds in one table: what is differentiated, which rows, which reference.

A :class:`pipeline.Problem` says which kind it is (``Problem.kind``); every
module that needs to know what that means looks it up here instead of
testing strings:

========  ==========================  =======================  =============================
kind      rows are over               differentiated function  single-process reference
========  ==========================  =======================  =============================
jacobian  ``fn(x).reshape(-1)``       ``fn``                   ``autograd.functional.jacobian``
hessian   ``x.reshape(-1)``           ``grad fn`` (scalar fn)  ``autograd.functional.hessian``
batched   ``(sample, fn(x[b]) row)``  ``fn`` per sample        ``jacobian`` per sample
========  ==========================  =======================  =============================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from pipeline.problem.problem import Kind

if TYPE_CHECKING:
    from torch import Tensor

#: How a result is stored: fixed-size rows, or (cols, values) per row.
Layout = Literal["dense", "sparse"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
#: How rows are computed: one VJP per row, one JVP per column, or one pass per colour.
Method = Literal["rev", "fwd", "sparse"]


def scalar_grad(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The gradient of a scalar function, as a function (``torch.func.grad``).

    The Hessian kind differentiates this; every module spells it through here.
    """
    import torch

    return torch.func.grad(lambda t: fn(t).reshape(()))


@dataclass(frozen=True)
class KindSpec:
    """What one derivative kind means (see the module docstring).

    Args:
        name: the kind.
        rows: ``(fn, x, start, stop, *, chunk_size, method) -> iterator of
            (first_row, block)``: the engine's row generator.
        reference: ``problem -> (rows, n) numpy``: torch's single-process answer.
        reference_rows: ``(problem, rows) -> (len(rows), n) numpy`` by plain autograd.
        symmetric: the derivative is symmetric (colour it with a star colouring).
        per_sample: ``x`` is a batch and rows are per sample.
    """

    name: Kind
    rows: Callable[..., Iterator[tuple[int, Tensor]]]
    reference: Callable[[Any], Any]
    reference_rows: Callable[[Any, Any], Any]
    symmetric: bool
    per_sample: bool

    def differentiated(self, problem: Any, sample: int = 0) -> tuple[Callable, Tensor]:
        """``(f, x)`` whose Jacobian is this kind's matrix (one sample if per-sample)."""
        if self.symmetric:
            return scalar_grad(problem.fn), problem.x
        if self.per_sample:
            return problem.fn, problem.x[sample]
        return problem.fn, problem.x


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported on first call (torch loads only when rows are computed)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


_E, _C = "pipeline.maths.engine", "pipeline.analysis.compare"
KINDS: dict[str, KindSpec] = {
    "jacobian": KindSpec(
        "jacobian", _lazy(_E, "iter_jacobian_rows"), _lazy(_C, "jacobian_reference"),
        _lazy(_C, "gradient_reference_rows"), symmetric=False, per_sample=False,
    ),
    "hessian": KindSpec(
        "hessian", _lazy(_E, "iter_hessian_rows"), _lazy(_C, "hessian_reference"),
        _lazy(_C, "gradient_reference_rows"), symmetric=True, per_sample=False,
    ),
    "batched": KindSpec(
        "batched", _lazy(_E, "iter_batched_rows"), _lazy(_C, "batched_reference"),
        _lazy(_C, "batched_reference_rows"), symmetric=False, per_sample=True,
    ),
}


def kind_of(name: str) -> KindSpec:
    """The :class:`KindSpec` of ``name``.

    Raises:
        ValueError: unknown kind.
    """
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown kind {name!r}; expected one of {tuple(KINDS)}") from None


def iter_rows(
    problem: Any, start: int, stop: int, *, chunk_size: int | None = None, method: str = "rev",
    m: int | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Rows ``[start, stop)`` of ``problem``'s derivative, chunk by chunk (dense methods).

    ``m``: outputs per sample, when known (per-sample kinds skip a forward pass to learn it).
    """
    spec = kind_of(problem.kind)
    extra = {"m": m} if spec.per_sample and m is not None else {}
    return spec.rows(problem.fn, problem.x, start, stop, chunk_size=chunk_size, method=method,
                     **extra)
