"""Poisson residual of a neural field: the Laplacian of an MLP ``u: R^dim -> R`` over points.

A physics-informed network is trained on ``-Lap u(x) - g(x)`` at collocation
points in the box ``[-1, 1]^dim``. The job's rows are the points, ``values``
holds ``Lap u(x_p)`` (collapsed Taylor mode, exact) and ``value`` holds
``u(x_p)``; the residual is ``-values - g`` with :func:`source`.

    jacpipe run poisson -p points=100000 -p dim=50 -p hidden=768,768,512,512
"""

from __future__ import annotations

import torch

from jobs._common import field_in_box
from pipeline import Problem


def source(points: torch.Tensor) -> torch.Tensor:
    """``g(x) = sum_d sin(pi x_d)``, the right-hand side the residual is checked against."""
    return torch.sin(torch.pi * points).sum(-1)


def build(points: int = 2000, dim: int = 2, hidden: str = "64,64", dtype: str = "float64",
          seed: int = 0) -> Problem:
    """Build the Poisson problem.

    Args:
        points: collocation points (rows).
        dim: dimension of the box (entries of one point).
        hidden: hidden widths of the tanh MLP, comma-separated (``768,768,512,512``
            for the 50 -> 768 -> 768 -> 512 -> 512 -> 1 net of the benchmarks).
        dtype: float32 or float64.
        seed: seed of the weights and of the points.
    """
    u, x = field_in_box(points, dim, hidden, dtype, seed)
    return Problem(fn=u, x=x, kind="laplacian")
