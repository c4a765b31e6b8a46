"""n-dimensional Rosenbrock function: a tridiagonal Hessian (kind hessian).

f(x) = sum_{i<n-1} 100 (x_{i+1} - x_i²)² + (1 - x_i)², at a seeded point near
the minimum (1, ..., 1). With ``pattern=true`` the problem carries its known
tridiagonal sparsity pattern (``scipy.sparse``) for the sparse engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from jobs._common import dtype_of, generator
from pipeline import JacpipeError, Problem

if TYPE_CHECKING:
    import scipy.sparse as sp


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """The scalar Rosenbrock function of a flat ``x`` (n >= 2)."""
    head, tail = x[:-1], x[1:]
    return (100.0 * (tail - head**2) ** 2 + (1.0 - head) ** 2).sum()


def tridiagonal_pattern(n: int) -> sp.csr_matrix:
    """The ``n x n`` boolean CSR pattern with the main, super and sub diagonals."""
    import numpy as np
    import scipy.sparse as sp

    i = np.arange(n)
    rows = np.concatenate([i, i[:-1], i[1:]])
    cols = np.concatenate([i, i[1:], i[:-1]])
    return sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(n, n))


def build(n: int = 1000, pattern: bool = False, dtype: str = "float64", seed: int = 0) -> Problem:
    """Build the Rosenbrock Hessian problem.

    Args:
        n: dimension (at least 2).
        pattern: attach the tridiagonal sparsity pattern.
        dtype: float32 or float64.
        seed: seed of the point x = 1 + 0.5 * N(0, 1).

    Returns:
        A hessian :class:`Problem` with ``x`` of shape ``(n,)``.
    """
    if n < 2:
        raise JacpipeError(f"parameter 'n' must be at least 2, got {n}")
    x = 1.0 + 0.5 * torch.randn(n, generator=generator(seed), dtype=torch.float64)
    return Problem(
        fn=rosenbrock,
        x=x.to(dtype_of(dtype)),
        kind="hessian",
        sparsity=tridiagonal_pattern(n) if pattern else None,
    )
