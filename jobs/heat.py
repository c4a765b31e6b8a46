"""Residual of one implicit step of the nonlinear 2-D heat equation on an N x N grid.

R(u) = u - u_prev - dt * alpha * Lap_h(G(u)),  G(u) = u + beta * u^3 / 3,

backward Euler for u_t = div(kappa(u) grad u) with kappa(u) = 1 + beta u^2
(written through the Kirchhoff transform G), zero Dirichlet boundary, and the
5-point Laplacian. Input and output are (N, N) fields; the Jacobian is sparse
with the 5-point pattern (set as ``Problem.sparsity`` when ``pattern=true``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jobs._common import dtype_of, generator, positive
from pipeline import Problem


def laplacian(u: torch.Tensor, h: float) -> torch.Tensor:
    """5-point Laplacian of an (N, N) field with zero Dirichlet boundary."""
    p = F.pad(u.unsqueeze(0), (1, 1, 1, 1)).squeeze(0)
    return (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u) / h**2


def build(
    N: int = 48,
    dt: float = 1e-4,
    alpha: float = 1.0,
    beta: float = 0.5,
    pattern: bool = True,
    dtype: str = "float64",
    seed: int = 0,
) -> Problem:
    """Build the heat-step residual problem.

    Args:
        N: grid points per side (n = m = N^2).
        dt: time step.
        alpha: diffusivity.
        beta: strength of the temperature-dependent conductivity.
        pattern: attach the 5-point sparsity pattern.
        dtype: float32 or float64.
        seed: seed of the previous state and of the point u.
    """
    positive("N", N)
    dt_ = dtype_of(dtype)
    g = generator(seed)
    h = 1.0 / (N + 1)
    grid = torch.linspace(h, 1 - h, N, dtype=torch.float64)
    bump = torch.sin(torch.pi * grid)[:, None] * torch.sin(torch.pi * grid)[None, :]
    u_prev = (bump + 0.05 * torch.randn(N, N, generator=g, dtype=torch.float64)).to(dt_)
    u = (u_prev.double() + 0.01 * torch.randn(N, N, generator=g, dtype=torch.float64)).to(dt_)

    def fn(v: torch.Tensor) -> torch.Tensor:
        return v - u_prev - dt * alpha * laplacian(v + beta * v**3 / 3, h)

    sparsity = None
    if pattern:
        from pipeline.sparse import stencil_pattern

        sparsity = stencil_pattern(N, 5)
    return Problem(fn=fn, x=u, sparsity=sparsity)
