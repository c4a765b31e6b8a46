"""The variants as tables: derivative kinds, storage layouts, and methods.

Every layer that needs to know what a kind or a layout means looks it up
here (:func:`kind_of`, :func:`layout_of`) instead of testing its name; a
test counts the string comparisons outside this module and the maths table
(:mod:`pipeline.maths.kinds`), which adds each kind's row generator and
single-process reference. A new kind is one row in each table plus its maths.

==========  ==========================  ==========================  ===============================
kind        rows are over               a row holds                 single-process reference
==========  ==========================  ==========================  ===============================
jacobian    ``fn(x).reshape(-1)``       ``d fn_i / dx``             ``autograd.functional.jacobian``
hessian     ``x.reshape(-1)``           ``d (grad fn)_i / dx``      ``autograd.functional.hessian``
batched     ``(sample, fn(x[b]) row)``  one sample's Jacobian row   ``jacobian`` per sample
laplacian   points ``x[p]``             ``Lap fn(x[p])`` per output  nested ``torch.func``
biharmonic  points ``x[p]``             ``Lap^2 fn(x[p])``           nested ``torch.func``
taylor      points ``x[p]``             ``D^K fn(x[p])[v, .., v]``   ``K`` nested ``jvp``
third       pairs ``j <= k`` of x       ``grad d^2 fn/dx_j dx_k``    ``jacrev`` of ``hessian``
params      ``(sample, model output)``  ``d out / d parameters``    ``jacobian`` per sample
==========  ==========================  ==========================  ===============================

Per-point kinds (``laplacian``, ``biharmonic``, ``taylor``) take ``x`` of shape
``(P, D)`` and an ``fn`` of one point; a row is a point and its columns the
operator's values (one per output of ``fn``), stored beside ``fn``'s own values
(``value``) and, for stochastic estimates, their standard errors (``stderr``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

T = TypeVar("T")

#: What is differentiated (one row of :data:`KINDS`).
Kind = Literal["jacobian", "hessian", "batched", "laplacian", "biharmonic", "taylor", "third",
               "params"]
#: What a kind's rows are over (see the module docstring).
RowsOver = Literal["outputs", "inputs", "points", "pairs"]
#: What a kind's columns are over: ``fn``'s input (one sample's), or a module's parameters.
ColumnsOver = Literal["inputs", "parameters"]
#: How a result is stored: fixed-size rows, or (cols, values) per row.
Layout = Literal["dense", "sparse"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
#: How rows are computed: one VJP per row, one JVP per column, or one pass per colour.
Method = Literal["rev", "fwd", "sparse"]
METHODS: tuple[str, ...] = get_args(Method)


@dataclass(frozen=True)
class KindSpec:
    """What one derivative kind means (see the module docstring).

    Args:
        name: the kind.
        rows: what the rows are over, for people.
        reference: torch's single-process reference, for people.
        symmetric: the matrix is the Jacobian of ``grad fn`` of a scalar ``fn``
            (square and symmetric: a star colouring, rows over ``x``).
        per_sample: ``x`` is a batch; rows are ``(sample, output)`` pairs and
            columns one sample's inputs.
        smoothable: randomized smoothing (``--smooth``) is defined for it.
        fd_columns: central differences of ``fn`` check its columns (``compare --fd``).
        rows_over: ``outputs`` (of ``fn``), ``inputs`` (of the gradient of a
            scalar ``fn``), ``points`` (one row per point: per-point operators)
            or ``pairs`` (``j <= k`` of a scalar ``fn``'s inputs: third derivatives).
        index_column: the part's integer column beside ``row`` (``sample`` of a
            per-sample row, ``point`` of a per-point row), else None.
        operator: the per-point operator's options it takes (``samples``,
            ``seed``, ``weights``, ``order``, ``direction``), empty for other kinds.
        sparse_ok: a sparsity pattern and colouring apply to it.
        hessian_pattern: ``Problem.sparsity`` is the Hessian's pattern (``n x n``,
            or ``"auto"``: detected): rows ``(j, k)`` outside it are zero and
            are not computed (third derivatives).
        columns_over: ``inputs`` (of ``fn``, one sample's for per-sample kinds) or
            ``parameters`` (a module's, flattened: ``Problem.from_module``).
    """

    name: Kind
    rows: str
    reference: str
    symmetric: bool = False
    per_sample: bool = False
    smoothable: bool = False
    fd_columns: bool = False
    rows_over: RowsOver = "outputs"
    index_column: str | None = None
    operator: tuple[str, ...] = ()
    sparse_ok: bool = False
    hessian_pattern: bool = False
    columns_over: ColumnsOver = "inputs"

    @property
    def plain(self) -> bool:
        """Rows are ``fn``'s own outputs at one point (a Jacobian, nothing composed)."""
        return self.rows_over == "outputs" and not self.per_sample

    @property
    def jacobian_rows(self) -> bool:
        """The rows are a Jacobian's: of ``fn`` (per sample or not) or of ``grad fn``."""
        return self.rows_over in ("outputs", "inputs")

    @property
    def per_point(self) -> bool:
        """A row is one point of a batch of points; its columns the operator's values."""
        return self.rows_over == "points"

    @property
    def scalar_fn(self) -> bool:
        """``fn`` must return a scalar (its gradient or its third derivatives are the rows)."""
        return self.rows_over in ("inputs", "pairs")

    def rows_and_columns(self, in_numel: int, out_numel: int) -> tuple[int, int]:
        """``(rows per sample, columns)`` for an ``fn`` of these input / output sizes.

        ``out_numel`` is what :class:`~pipeline.core.shapes.Shapes` keeps as the
        output size: ``fn``'s outputs, the Hessian's rows (the input size) or the
        number of pairs ``n (n + 1) / 2``.
        """
        if self.per_point:
            return 1, out_numel
        return out_numel, in_numel

    def out_shape(self, in_shape: tuple[int, ...], fn_shape: tuple[int, ...]) -> tuple[int, ...]:
        """What :class:`~pipeline.core.shapes.Shapes` records as the output shape."""
        if self.rows_over == "inputs":
            return in_shape
        if self.rows_over == "pairs":
            n = 1
            for s in in_shape:
                n *= int(s)
            return (n * (n + 1) // 2,)
        return fn_shape


_STOCHASTIC = ("samples", "seed")
KINDS: dict[str, KindSpec] = {
    "jacobian": KindSpec("jacobian", "fn(x).reshape(-1)", "autograd.functional.jacobian",
                         smoothable=True, fd_columns=True, sparse_ok=True),
    "hessian": KindSpec("hessian", "x.reshape(-1)", "autograd.functional.hessian",
                        symmetric=True, rows_over="inputs", sparse_ok=True),
    "batched": KindSpec("batched", "(sample, fn(x[b]) row)", "jacobian per sample",
                        per_sample=True, index_column="sample"),
    "laplacian": KindSpec("laplacian", "points x[p]", "nested torch.func (trace of hessian)",
                          per_sample=True, rows_over="points", index_column="point",
                          operator=(*_STOCHASTIC, "weights")),
    "biharmonic": KindSpec("biharmonic", "points x[p]", "nested torch.func (four levels)",
                           per_sample=True, rows_over="points", index_column="point",
                           operator=_STOCHASTIC),
    "taylor": KindSpec("taylor", "points x[p]", "K nested torch.func.jvp",
                       per_sample=True, rows_over="points", index_column="point",
                       operator=("order", "direction")),
    "third": KindSpec("third", "pairs j <= k of x", "jacrev(jacrev(jacrev(fn)))",
                      rows_over="pairs", hessian_pattern=True),
    "params": KindSpec("params", "(sample, model(x[b]) row)", "jacobian of functional_call",
                       per_sample=True, index_column="sample", columns_over="parameters"),
}
KIND_NAMES: tuple[str, ...] = tuple(KINDS)


def kind_of(name: str) -> KindSpec:
    """The :class:`KindSpec` of ``name``.

    Raises:
        ValueError: unknown kind.
    """
    return _row(KINDS, name, "kind")


@dataclass(frozen=True)
class LayoutSpec:
    """How one layout stores a row (the schema itself is :mod:`pipeline.store.parts`'s).

    Args:
        name: the layout.
        fixed_width: every row holds all ``n`` columns (``values`` is a
            fixed-size list), so a shard's row count is exact and rows read
            back as a dense ``numpy`` block; otherwise each row holds its
            own ``cols`` and rows read back as ``scipy.sparse``.
        read_as: what :func:`pipeline.read_jacobian` returns by default.
    """

    name: Layout
    fixed_width: bool
    read_as: str


LAYOUT_TABLE: dict[str, LayoutSpec] = {
    "dense": LayoutSpec("dense", fixed_width=True, read_as="numpy"),
    "sparse": LayoutSpec("sparse", fixed_width=False, read_as="scipy"),
}


def layout_of(name: str) -> LayoutSpec:
    """The :class:`LayoutSpec` of ``name``.

    Raises:
        ValueError: unknown layout.
    """
    return _row(LAYOUT_TABLE, name, "layout")


def _row(table: dict[str, T], name: str, what: str) -> T:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; expected one of {tuple(table)}") from None
