"""Dense two-layer perceptron R^n -> R^m: x -> W2 tanh(W1 x + b1) + b2."""

from __future__ import annotations

import torch

from jobs._common import dtype_of, generator, positive
from pipeline import Problem

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "softplus": torch.nn.functional.softplus}


def build(
    n: int = 2000,
    m: int = 2000,
    hidden: int = 512,
    activation: str = "tanh",
    dtype: str = "float32",
    seed: int = 0,
    device: str = "cpu",
) -> Problem:
    """Build the MLP Jacobian problem.

    Args:
        n: input size (columns of J).
        m: output size (rows of J).
        hidden: hidden width.
        activation: tanh, relu or softplus.
        dtype: float32 or float64.
        seed: seed of the weights and of x.
        device: where the weights and x live (``cpu`` or ``cuda``); workers
            given a GPU pass ``cuda``. Drawn on the CPU first, so every
            device gets the same numbers.
    """
    from pipeline import JacpipeError

    for name, value in (("n", n), ("m", m), ("hidden", hidden)):
        positive(name, value)
    if activation not in ACTIVATIONS:
        raise JacpipeError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    dt = dtype_of(dtype)
    g = generator(seed)
    w1 = torch.randn(hidden, n, generator=g, dtype=dt).div_(n**0.5)  # in place: no 2nd copy
    b1 = torch.randn(hidden, generator=g, dtype=dt).mul_(0.1)
    w2 = torch.randn(m, hidden, generator=g, dtype=dt).div_(hidden**0.5)
    b2 = torch.randn(m, generator=g, dtype=dt).mul_(0.1)
    x = torch.randn(n, generator=g, dtype=dt)
    if device != "cpu":
        w1, b1, w2, b2, x = (t.to(device) for t in (w1, b1, w2, b2, x))
    act = ACTIVATIONS[activation]

    def fn(v: torch.Tensor) -> torch.Tensor:
        return w2 @ act(w1 @ v + b1) + b2

    return Problem(fn=fn, x=x)
