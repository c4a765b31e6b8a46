"""UAV trajectory-optimisation cost over a discretised 3-D path: a banded Hessian (kind hessian).

x holds K waypoints (K x 3, n = 3K) of a path that leaves a fixed start. The
cost is smoothness (squared second differences, the discrete ∫‖p''‖²), path
length (squared first differences), a soft barrier around a few seeded
spherical obstacles and a goal term on the last waypoint::

    f(x) = w_s Σ‖p_{k+1} - 2p_k + p_{k-1}‖² + w_l Σ‖p_{k+1} - p_k‖²
         + w_o Σ_k Σ_j softplus(β (1 - ‖x_k - c_j‖² / r_j²)) / β + w_g ‖x_{K-1} - goal‖²

with p = (start, x_0, ..., x_{K-1}). x is the straight line from start to goal
plus seeded noise, so the path crosses the obstacles and their barrier is
active. The Hessian is banded: a dense 3 x 3 block per waypoint (the obstacle
terms couple its x, y, z) and, for waypoints one or two apart, the same
coordinate only (the difference terms); ``pattern=true`` attaches that pattern
for the sparse engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from jobs._common import dtype_of, generator, positive
from pipeline import JacpipeError, Problem

START = (0.0, 0.0, 0.0)
GOAL = (10.0, 10.0, 3.0)
W_SMOOTH, W_LENGTH, W_OBSTACLE, W_GOAL = 50.0, 1.0, 10.0, 100.0
BETA = 4.0  # sharpness of the obstacle barrier

if TYPE_CHECKING:
    import scipy.sparse as sp


def band_pattern(waypoints: int) -> sp.csr_matrix:
    """Boolean CSR pattern of the Hessian (see the module docstring)."""
    import numpy as np
    import scipy.sparse as sp

    n = 3 * waypoints
    i = np.arange(n)
    first = i - i % 3  # first entry of i's waypoint
    rows = [np.repeat(i, 3)]  # a dense 3 x 3 block per waypoint
    cols = [(first[:, None] + np.arange(3)).reshape(-1)]
    for d in (3, 6):  # the same coordinate of waypoints one or two apart
        rows += [i[:-d], i[d:]]
        cols += [i[d:], i[:-d]]
    r, c = np.concatenate(rows), np.concatenate(cols)
    return sp.csr_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=(n, n))


def build(
    waypoints: int = 500,
    obstacles: int = 4,
    pattern: bool = False,
    dtype: str = "float64",
    seed: int = 0,
) -> Problem:
    """Build the trajectory cost's Hessian problem.

    Args:
        waypoints: K free waypoints (n = 3K); at least 2.
        obstacles: number of seeded spheres near the straight path.
        pattern: attach the block-pentadiagonal sparsity pattern.
        dtype: float32 or float64.
        seed: seed of the obstacles and of the path's noise.

    Returns:
        A hessian :class:`Problem` with ``x`` of shape ``(waypoints, 3)``.
    """
    if waypoints < 2:
        raise JacpipeError(f"parameter 'waypoints' must be at least 2, got {waypoints}")
    positive("obstacles", obstacles)
    dt = dtype_of(dtype)
    g = generator(seed)
    start = torch.tensor(START, dtype=torch.float64)
    goal = torch.tensor(GOAL, dtype=torch.float64)
    # Obstacles: centres on the straight line (shifted a little), radii 0.8..1.6 m.
    along = (torch.arange(obstacles, dtype=torch.float64) + 0.5) / obstacles
    centres = start + along[:, None] * (goal - start)
    centres = centres + 0.4 * torch.randn(obstacles, 3, generator=g, dtype=torch.float64)
    radii = 0.8 + 0.8 * torch.rand(obstacles, generator=g, dtype=torch.float64)
    t = torch.arange(1, waypoints + 1, dtype=torch.float64)[:, None] / waypoints
    x = start + t * (goal - start) + 0.05 * torch.randn(waypoints, 3, generator=g,
                                                         dtype=torch.float64)
    start, goal, centres, inv_r2 = (v.to(dt) for v in (start, goal, centres, radii**-2))

    def fn(path: torch.Tensor) -> torch.Tensor:
        """The scalar cost of waypoints ``path`` (K, 3)."""
        p = torch.cat([start[None], path])
        step = p[1:] - p[:-1]
        bend = step[1:] - step[:-1]
        d2 = ((path[:, None, :] - centres[None]) ** 2).sum(-1)  # (K, obstacles)
        barrier = torch.nn.functional.softplus(BETA * (1 - d2 * inv_r2)) / BETA
        return (
            W_SMOOTH * (bend**2).sum()
            + W_LENGTH * (step**2).sum()
            + W_OBSTACLE * barrier.sum()
            + W_GOAL * ((path[-1] - goal) ** 2).sum()
        )

    return Problem(
        fn=fn,
        x=x.to(dt),
        kind="hessian",
        sparsity=band_pattern(waypoints) if pattern else None,
    )
