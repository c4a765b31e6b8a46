"""Allen-Cahn in high dimension: a stochastic Laplacian of an MLP over points (Hutchinson).

In ``dim = 1000`` the exact Laplacian needs 1,000 directions per point; the
Hutchinson estimate ``E[v^T H v]`` over ``samples`` Rademacher directions
needs ``samples``, and stores its standard error beside it (``stderr``). The
residual of ``u_t = Lap u + u - u^3`` at steady state is ``-values - value +
value^3``.

    jacpipe run allen_cahn -p points=10000 -p dim=1000 -p samples=64
"""

from __future__ import annotations

from jobs._common import field_in_box
from pipeline import Problem


def build(points: int = 500, dim: int = 1000, samples: int = 64, seed: int = 0,
          hidden: str = "128,128", dtype: str = "float64") -> Problem:
    """Build the Allen-Cahn problem.

    Args:
        points: points in ``[-1, 1]^dim`` (rows).
        dim: dimension.
        samples: random directions per point (even; the estimate's standard
            error falls as ``1 / sqrt(samples)``).
        seed: seed of the weights, the points and the directions.
        hidden: hidden widths of the tanh MLP.
        dtype: float32 or float64.
    """
    u, x = field_in_box(points, dim, hidden, dtype, seed)
    return Problem(fn=u, x=x, kind="laplacian", operator={"samples": samples, "seed": seed})
