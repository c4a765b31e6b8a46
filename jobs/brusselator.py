"""2-D Brusselator reaction-diffusion right-hand side on a periodic N x N grid (sparse).

The standard sparse-AD benchmark (SparseDiffTools.jl, asdex): two fields u, v
on the periodic unit square with the 5-point Laplacian,

    du = 1 + u^2 v - 4.4 u + alpha Lap(u)
    dv = 3.4 u - u^2 v + alpha Lap(v)

(A = 3.4, B = 1; the time-dependent forcing is omitted). x = [u, v] flattened
(length 2 N^2), so the Jacobian is (2 N^2, 2 N^2) with the exact pattern
"5-point periodic stencil in each block plus the identity coupling u <-> v",
set as ``Problem.sparsity`` unless ``pattern=false``. The point is the usual initial state
u = 22 (y (1 - y))^1.5, v = 27 (x (1 - x))^1.5.
"""

from __future__ import annotations

import scipy.sparse as sp
import torch

from jobs._common import dtype_of, positive
from pipeline import Problem
from pipeline.sparse import stencil_pattern


def laplacian(u: torch.Tensor, h: float) -> torch.Tensor:
    """Periodic 5-point Laplacian of an (N, N) field with spacing h."""
    near = u.roll(1, 0) + u.roll(-1, 0) + u.roll(1, 1) + u.roll(-1, 1)
    return (near - 4 * u) / h**2


def brusselator_pattern(N: int) -> sp.csr_matrix:
    """Exact sparsity pattern of the Brusselator Jacobian on an N x N grid."""
    stencil = stencil_pattern(N, 5, periodic=True)
    eye = sp.identity(N * N, dtype=bool, format="csr")
    out = sp.bmat([[stencil, eye], [eye, stencil]], format="csr").astype(bool)
    out.sort_indices()
    return out


def build(N: int = 32, alpha: float = 10.0, pattern: bool = True,
          dtype: str = "float64") -> Problem:
    """Build the Brusselator right-hand-side problem.

    Args:
        N: grid points per side (n = m = 2 N^2).
        alpha: diffusion coefficient.
        pattern: attach the exact sparsity pattern (false: none).
        dtype: float32 or float64.
    """
    positive("N", N)
    dt_ = dtype_of(dtype)
    h = 1.0 / N
    grid = torch.arange(N, dtype=torch.float64) * h
    gx, gy = torch.meshgrid(grid, grid, indexing="ij")
    u0 = 22 * (gy * (1 - gy)) ** 1.5
    v0 = 27 * (gx * (1 - gx)) ** 1.5
    x = torch.cat([u0.reshape(-1), v0.reshape(-1)]).to(dt_)

    def fn(state: torch.Tensor) -> torch.Tensor:
        u, v = state[: N * N].reshape(N, N), state[N * N :].reshape(N, N)
        uuv = u * u * v
        du = 1 + uuv - 4.4 * u + alpha * laplacian(u, h)
        dv = 3.4 * u - uuv + alpha * laplacian(v, h)
        return torch.cat([du.reshape(-1), dv.reshape(-1)])

    return Problem(fn=fn, x=x, sparsity=brusselator_pattern(N) if pattern else None)
