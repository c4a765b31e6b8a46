"""Forward kinematics of a 6-joint arm (UR5 geometry): joint angles -> end-effector pose.

The output is the end-effector position (3) followed by its rotation matrix
(9, row-major), so the Jacobian is 12 x 6. With ``batch > 0`` the problem is
per-sample over ``batch`` seeded joint configurations (kind ``batched``):
the (batch, 12, 6) Jacobians, never the batch² cross terms.
"""

from __future__ import annotations

import math

import torch

from jobs._common import dtype_of, generator
from pipeline import JacpipeError, Problem

# Denavit-Hartenberg parameters of a UR5 (metres, radians).
D = (0.089159, 0.0, 0.0, 0.10915, 0.09465, 0.0823)
A = (0.0, -0.425, -0.39225, 0.0, 0.0, 0.0)
ALPHA = (math.pi / 2, 0.0, 0.0, math.pi / 2, -math.pi / 2, 0.0)


def dh_transform(theta: torch.Tensor, d: float, a: float, alpha: float) -> torch.Tensor:
    """The 4x4 homogeneous transform of one DH link (built without in-place writes).

    Constants are tensors of theta's dtype: in torch 2.13 a Python float times a
    0-d tensor gives a float64 tangent under forward-mode AD, even for float32.
    """
    ct, st = torch.cos(theta), torch.sin(theta)
    zero, one = torch.zeros_like(theta), torch.ones_like(theta)
    ca, sa = one * math.cos(alpha), one * math.sin(alpha)
    a, d = one * a, one * d
    rows = [
        torch.stack([ct, -st * ca, st * sa, a * ct]),
        torch.stack([st, ct * ca, -ct * sa, a * st]),
        torch.stack([zero, sa, ca, d]),
        torch.stack([zero, zero, zero, one]),
    ]
    return torch.stack(rows)


def forward_kinematics(q: torch.Tensor) -> torch.Tensor:
    """End-effector position and flattened rotation for joint angles ``q`` (6,)."""
    t = torch.eye(4, dtype=q.dtype)
    for i in range(6):
        t = t @ dh_transform(q[i], D[i], A[i], ALPHA[i])
    return torch.cat([t[:3, 3], t[:3, :3].reshape(-1)])


def build(batch: int = 0, dtype: str = "float64", seed: int = 0) -> Problem:
    """Build the arm's Jacobian problem.

    Args:
        batch: 0 for one configuration; B > 0 for B per-sample Jacobians.
        dtype: float32 or float64.
        seed: seed of the joint configurations.
    """
    if batch < 0:
        raise JacpipeError(f"parameter 'batch' must be >= 0, got {batch}")
    dt = dtype_of(dtype)
    g = generator(seed)
    shape = (batch, 6) if batch else (6,)
    q = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    return Problem(fn=forward_kinematics, x=q.to(dt), kind="batched" if batch else "jacobian")
