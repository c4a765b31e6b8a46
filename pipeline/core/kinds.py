"""The variants as tables: derivative kinds, storage layouts, and methods.

Every layer that needs to know what a kind or a layout means looks it up
here (:func:`kind_of`, :func:`layout_of`) instead of testing its name; a
test counts the string comparisons outside this module and the maths table
(:mod:`pipeline.maths.kinds`), which adds each kind's row generator and
single-process reference. A new kind is one row in each table plus its maths.

========  ==========================  =======================  =============================
kind      rows are over               differentiated function  single-process reference
========  ==========================  =======================  =============================
jacobian  ``fn(x).reshape(-1)``       ``fn``                   ``autograd.functional.jacobian``
hessian   ``x.reshape(-1)``           ``grad fn`` (scalar fn)  ``autograd.functional.hessian``
batched   ``(sample, fn(x[b]) row)``  ``fn`` per sample        ``jacobian`` per sample
========  ==========================  =======================  =============================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

#: What is differentiated (one row of :data:`KINDS`).
Kind = Literal["jacobian", "hessian", "batched"]
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
    """

    name: Kind
    rows: str
    reference: str
    symmetric: bool = False
    per_sample: bool = False
    smoothable: bool = False
    fd_columns: bool = False

    @property
    def plain(self) -> bool:
        """Rows are ``fn``'s own outputs at one point (neither a gradient's nor per sample)."""
        return not (self.symmetric or self.per_sample)


KINDS: dict[str, KindSpec] = {
    "jacobian": KindSpec("jacobian", "fn(x).reshape(-1)", "autograd.functional.jacobian",
                         smoothable=True, fd_columns=True),
    "hessian": KindSpec("hessian", "x.reshape(-1)", "autograd.functional.hessian",
                        symmetric=True),
    "batched": KindSpec("batched", "(sample, fn(x[b]) row)", "jacobian per sample",
                        per_sample=True),
}
KIND_NAMES: tuple[str, ...] = tuple(KINDS)


def kind_of(name: str) -> KindSpec:
    """The :class:`KindSpec` of ``name``.

    Raises:
        ValueError: unknown kind.
    """
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown kind {name!r}; expected one of {KIND_NAMES}") from None


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
    try:
        return LAYOUT_TABLE[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; expected one of {LAYOUTS}") from None
