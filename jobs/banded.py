"""Iterated nonlinear 3-point smoothing on a line: a banded Jacobian with 2k+1 bands (sparse).

k times y_i <- tanh(a y_{i-1} + b y_i + c y_{i+1}) with zero boundary values,
starting from y = x (length n). Each step is tridiagonal, so the Jacobian of
k steps has the 2k + 1 central bands, set as ``Problem.sparsity`` when
``pattern=true``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jobs._common import dtype_of, generator, positive
from pipeline import Problem
from pipeline.sparse import banded_pattern


def build(
    n: int = 2000,
    k: int = 2,
    a: float = 0.5,
    b: float = 1.0,
    c: float = -0.3,
    pattern: bool = True,
    dtype: str = "float64",
    seed: int = 0,
) -> Problem:
    """Build the iterated banded map.

    Args:
        n: length of x and of the output.
        k: number of smoothing steps (the Jacobian has 2k + 1 bands).
        a: weight of the left neighbour.
        b: weight of the point itself.
        c: weight of the right neighbour.
        pattern: attach the banded sparsity pattern (false: none; the
            planner may then detect it).
        dtype: float32 or float64.
        seed: seed of the point x.
    """
    positive("n", n)
    positive("k", k)
    x = torch.randn(n, generator=generator(seed), dtype=torch.float64).to(dtype_of(dtype))

    def fn(y: torch.Tensor) -> torch.Tensor:
        for _ in range(k):
            p = F.pad(y, (1, 1))
            y = torch.tanh(a * p[:-2] + b * p[1:-1] + c * p[2:])
        return y

    return Problem(fn=fn, x=x, sparsity=banded_pattern(n, 2 * k + 1) if pattern else None)
