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
from pipeline.maths import engine, operators, params, references

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
        columns: ``(problem, start, stop, *, chunk_size) -> iterator of (first_row,
            {column: block})`` for kinds whose parts hold more than ``values``
            (per-point operators: ``value``, ``stderr``), else None.
        row_numel: ``problem -> elements one row carries through a pass``, for
            kinds not computed by the engine's vectorised VJPs (whose count is
            :func:`~pipeline.maths.engine.intermediate_numel`), else None.
        compiles: ``rows`` takes ``compile=`` (NOTE: [Compiled row passes] in
            :mod:`pipeline.maths.engine`).
    """

    spec: KindSpec
    rows: Callable[..., Iterator[tuple[int, Tensor]]]
    reference: Callable[[Any], Any]
    reference_rows: Callable[[Any, Any], Any]
    columns: Callable[..., Iterator[tuple[int, dict[str, Tensor]]]] | None = None
    row_numel: Callable[[Any], int] | None = None
    compiles: bool = False

    def differentiated(self, problem: Problem, sample: int = 0) -> tuple[Callable, Tensor]:
        """``(f, x)`` whose Jacobian is this kind's matrix (one sample if per-sample)."""
        if self.spec.symmetric:
            return scalar_grad(problem.fn), problem.x
        if not self.spec.jacobian_rows:
            raise ValueError(f"kind {self.spec.name!r}: its rows are not one function's Jacobian")
        if self.spec.columns_over == "parameters":
            return problem.fn.of_parameters(problem.x[sample]), problem.fn.flat
        if self.spec.per_sample:
            return problem.fn, problem.x[sample]
        return problem.fn, problem.x


KIND_MATHS: dict[str, KindMaths] = {
    "jacobian": KindMaths(KINDS["jacobian"], engine.iter_jacobian_rows,
                          references.jacobian_reference, references.gradient_reference_rows,
                          compiles=True),
    "hessian": KindMaths(KINDS["hessian"], engine.iter_hessian_rows,
                         references.hessian_reference, references.gradient_reference_rows,
                         compiles=True),
    "batched": KindMaths(KINDS["batched"], engine.iter_batched_rows,
                         references.batched_reference, references.batched_reference_rows,
                         compiles=True),
    **{name: KindMaths(KINDS[name], operators.point_rows, operators.point_reference,
                       operators.point_reference_rows, columns=operators.point_columns,
                       row_numel=operators.point_row_numel)
       for name in ("laplacian", "biharmonic", "taylor")},
    "third": KindMaths(KINDS["third"], operators.iter_third_rows, operators.third_reference,
                       operators.third_reference_rows, row_numel=operators.third_row_numel),
    "params": KindMaths(KINDS["params"], params.iter_param_rows, params.param_reference,
                        params.param_reference_rows, row_numel=params.param_row_numel),
}


def maths_of(name: str) -> KindMaths:
    """The :class:`KindMaths` of kind ``name``.

    Raises:
        ValueError: unknown kind.
    """
    return KIND_MATHS[kind_of(name).name]


def iter_rows(
    problem: Problem, start: int, stop: int, *, chunk_size: int | None = None,
    method: str = "rev", m: int | None = None, pattern: Any = None, compile: str = "auto",
) -> Iterator[tuple[int, Tensor]]:
    """Rows ``[start, stop)`` of ``problem``'s derivative, chunk by chunk (dense methods).

    ``m``: outputs per sample, when known (per-sample kinds skip a forward pass to learn it).
    ``pattern``: the Hessian's pattern of a kind that skips the rows outside it (third).
    ``compile``: ``--compile`` for the kinds whose passes compile (``KindMaths.compiles``).
    """
    maths = maths_of(problem.kind)
    extra: dict[str, Any] = {"m": m} if maths.spec.per_sample and m is not None else {}
    if maths.spec.per_point:
        extra = {"kind": problem.kind, "operator": problem.operator}
    if maths.spec.hessian_pattern:
        extra = {"pattern": pattern}
    if maths.compiles:
        extra["compile"] = compile
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
