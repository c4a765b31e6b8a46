"""One semi-implicit Euler step of a point mass with penalty contact against the ground z = 0.

The state is ``s = (x, y, z, vx, vy, vz)`` (position, velocity; flat input
indices 0..5) and the function is one time step ``s -> s_next``:

    pen = max(0, -z)                                  penetration depth
    N   = stiffness * pen - damping * pen * vz        normal force (Hunt-Crossley
                                                      damping: active only in contact)
    F   = (-mu N tanh(vx / v_slip), -mu N tanh(vy / v_slip), N - mass * gravity)
    v'  = v + dt * F / mass,      p' = p + dt * v'    (semi-implicit Euler)

so the Jacobian is 6 x 6 (rows: next state, columns: state).

Non-smooth inputs: ``max(0, -z)`` has a kink at z = 0, and the default state
puts the mass exactly there (z = 0, moving down at vz = -1 with vx = 0.5), so
the step is **not differentiable in z (input 2)**: the one-sided derivatives
of vz' differ by dt * (stiffness - damping * vz) / mass (= 100.5 at the
defaults), those of z' by dt times that, and those of vx', x' by the friction
share mu * tanh(vx / v_slip) of it. AD returns the derivative of the
out-of-contact side (torch's ``relu'(0) = 0``), a central finite difference
the average of both sides. Every other input is smooth at the default state:
with z fixed at 0 the penetration, hence every contact term, is identically
zero in a neighbourhood of (x, y, vx, vy, vz), and the regularised Coulomb
friction ``tanh(v / v_slip)`` is smooth in the velocities.
"""

from __future__ import annotations

import torch

from jobs._common import dtype_of
from pipeline import JacpipeError, Problem


def build(
    dt: float = 0.01,
    stiffness: float = 1e4,
    damping: float = 50.0,
    mass: float = 1.0,
    gravity: float = 9.81,
    friction: float = 0.5,
    slip_velocity: float = 0.01,
    z0: float = 0.0,
    vz0: float = -1.0,
    dtype: str = "float64",
) -> Problem:
    """Build the contact-step Jacobian problem.

    Args:
        dt: time step (s).
        stiffness: penalty stiffness k of the ground (N/m).
        damping: Hunt-Crossley damping c; the damping force c * pen * (-vz)
            vanishes out of contact.
        mass: mass of the point (kg).
        gravity: gravitational acceleration (m/s^2), along -z.
        friction: Coulomb coefficient mu (0 disables friction).
        slip_velocity: regularisation speed of the friction's tanh (m/s).
        z0: height of the default state; 0 puts it on the contact switching point.
        vz0: vertical velocity of the default state.
        dtype: float32 or float64.

    Raises:
        JacpipeError: a non-positive dt, mass or slip_velocity, or a negative
            stiffness, damping or friction.
    """
    for name, value in (("dt", dt), ("mass", mass), ("slip_velocity", slip_velocity)):
        if not value > 0:
            raise JacpipeError(f"parameter {name!r} must be positive, got {value}")
    for name, value in (("stiffness", stiffness), ("damping", damping), ("friction", friction)):
        if not value >= 0:
            raise JacpipeError(f"parameter {name!r} must be non-negative, got {value}")
    x = torch.tensor([0.1, -0.2, z0, 0.5, 0.0, vz0], dtype=dtype_of(dtype))

    def step(s: torch.Tensor) -> torch.Tensor:
        p, v = s[:3], s[3:]
        # NOTE: relu, not clamp: relu'(0) = 0, so at z = 0 AD takes the
        # out-of-contact side; the kink is what the FD check reports.
        pen = torch.relu(-p[2])
        normal = stiffness * pen - damping * pen * v[2]
        fx = -friction * normal * torch.tanh(v[0] / slip_velocity)
        fy = -friction * normal * torch.tanh(v[1] / slip_velocity)
        fz = normal - mass * gravity
        v_next = v + (dt / mass) * torch.stack((fx, fy, fz))
        p_next = p + dt * v_next
        return torch.cat((p_next, v_next))

    return Problem(fn=step, x=x)
