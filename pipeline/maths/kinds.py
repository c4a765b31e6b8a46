"""The maths of each kind: its row generator and torch's single-process references.

The other half of the kind table (:mod:`pipeline.core.kinds` says what a kind
*is*; this says how its rows and references are *computed*). A new kind adds a
row to both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.core.kinds import KINDS, KindSpec, kind_of
from pipeline.maths import engine, references

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.problem.problem import Problem


def scalar_grad(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The gradient of a scalar function, as a function (``torch.func.grad``).

    The symmetric (Hessian) kind differentiates this; every module spells it through here.
    """
    import torch

    return torch.func.grad(lambda t: fn(t).reshape(()))


@dataclass(frozen=True)
class KindMaths:
    """How one kind's rows and references are computed.

    Args:
        spec: what the kind is (:class:`pipeline.core.kinds.KindSpec`).
        rows: ``(fn, x, start, stop, *, chunk_size, method) -> iterator of
            (first_row, block)``: the engine's row generator.
        reference: ``problem -> (rows, n) numpy``: torch's single-process answer.
        reference_rows: ``(problem, rows) -> (len(rows), n) numpy`` by plain autograd.
    """

    spec: KindSpec
    rows: Callable[..., Iterator[tuple[int, Tensor]]]
    reference: Callable[[Any], Any]
    reference_rows: Callable[[Any, Any], Any]

    def differentiated(self, problem: Problem, sample: int = 0) -> tuple[Callable, Tensor]:
        """``(f, x)`` whose Jacobian is this kind's matrix (one sample if per-sample)."""
        if self.spec.symmetric:
            return scalar_grad(problem.fn), problem.x
        if self.spec.per_sample:
            return problem.fn, problem.x[sample]
        return problem.fn, problem.x


KIND_MATHS: dict[str, KindMaths] = {
    "jacobian": KindMaths(KINDS["jacobian"], engine.iter_jacobian_rows,
                          references.jacobian_reference, references.gradient_reference_rows),
    "hessian": KindMaths(KINDS["hessian"], engine.iter_hessian_rows,
                         references.hessian_reference, references.gradient_reference_rows),
    "batched": KindMaths(KINDS["batched"], engine.iter_batched_rows,
                         references.batched_reference, references.batched_reference_rows),
}


def maths_of(name: str) -> KindMaths:
    """The :class:`KindMaths` of kind ``name``.

    Raises:
        ValueError: unknown kind.
    """
    return KIND_MATHS[kind_of(name).name]


def iter_rows(
    problem: Problem, start: int, stop: int, *, chunk_size: int | None = None,
    method: str = "rev", m: int | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Rows ``[start, stop)`` of ``problem``'s derivative, chunk by chunk (dense methods).

    ``m``: outputs per sample, when known (per-sample kinds skip a forward pass to learn it).
    """
    maths = maths_of(problem.kind)
    extra = {"m": m} if maths.spec.per_sample and m is not None else {}
    return maths.rows(problem.fn, problem.x, start, stop, chunk_size=chunk_size, method=method,
                      **extra)


def reference_rows(problem: Problem, rows: Any) -> Any:
    """Rows of the derivative by plain autograd, in one process.

    Jacobian rows: one ``autograd.grad`` per row; Hessian rows: one
    ``autograd.grad`` of the gradient (built with ``create_graph``) per row;
    batched rows: ``torch.autograd.functional.jacobian`` of each sample that
    the rows touch (a per-sample loop, never the ``B²`` cross terms).

    Args:
        problem: a :class:`pipeline.Problem`.
        rows: flat row indices (numpy int array).

    Returns:
        numpy array ``(len(rows), n)``.
    """
    return maths_of(problem.kind).reference_rows(problem, rows)


def reference_full(problem: Problem) -> Any:
    """The whole derivative with torch's one-process functions, as numpy ``(rows, n)``."""
    return maths_of(problem.kind).reference(problem)
