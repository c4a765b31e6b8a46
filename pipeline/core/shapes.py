"""Shapes and sizes of a derivative: what every layer knows about a result's rows and columns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.core.kinds import Kind, kind_of


@dataclass(frozen=True)
class Shapes:
    """Shapes and sizes of a problem's derivative.

    Rows are indexed over ``fn(x).reshape(-1)`` (hessian: over ``x.reshape(-1)``;
    batched: over ``(sample, row)`` as ``sample * m + row``; third: over pairs
    ``j <= k``; per-point kinds: over points), columns over ``x.reshape(-1)``
    (batched: one sample; per-point kinds: the operator's value per output).
    """

    kind: Kind
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    batch: int | None
    dtype: str

    @property
    def m(self) -> int:
        """Rows per sample (per point: one)."""
        return kind_of(self.kind).rows_and_columns(_numel(self.in_shape),
                                                   _numel(self.out_shape))[0]

    @property
    def n(self) -> int:
        """Columns (per point: the operator's values, one per output of ``fn``)."""
        return kind_of(self.kind).rows_and_columns(_numel(self.in_shape),
                                                   _numel(self.out_shape))[1]

    @property
    def total_rows(self) -> int:
        """Rows over the whole result (batched: ``B * m``)."""
        return self.m * (self.batch or 1)

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The result as a tensor: ``out_shape + in_shape`` (batched: ``(B,) +`` that;
        per-point: ``(P,) + out_shape``; third: ``in_shape`` three times, symmetric)."""
        kind = kind_of(self.kind)
        if kind.per_point:
            return (self.batch or 0, *self.out_shape)
        if kind.rows_over == "pairs":
            return tuple(self.in_shape) * 3
        lead = (self.batch or 0,) if kind.per_sample else ()
        return lead + tuple(self.out_shape) + tuple(self.in_shape)

    @property
    def itemsize(self) -> int:
        """Bytes of one entry (4 for float32, 8 for float64)."""
        return 4 if self.dtype == "float32" else 8

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "batch": self.batch,
            "dtype": self.dtype,
            "m": self.m,
            "n": self.n,
            "total_rows": self.total_rows,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Shapes:
        return cls(
            kind=d["kind"],
            in_shape=tuple(d["in_shape"]),
            out_shape=tuple(d["out_shape"]),
            batch=d.get("batch"),
            dtype=d["dtype"],
        )


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
