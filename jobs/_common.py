"""Small things every built-in job shares: dtype names and seeded generators."""

from __future__ import annotations

import torch

from pipeline import JacpipeError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def dtype_of(name: str) -> torch.dtype:
    """``"float32"``/``"float64"`` to a torch dtype.

    Raises:
        JacpipeError: any other name.
    """
    try:
        return DTYPES[name]
    except KeyError:
        raise JacpipeError(f"dtype must be float32 or float64, got {name!r}") from None


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: every worker draws the same numbers."""
    return torch.Generator().manual_seed(int(seed))


def positive(name: str, value: int) -> int:
    """Check a size parameter.

    Raises:
        JacpipeError: ``value < 1``.
    """
    if value < 1:
        raise JacpipeError(f"parameter {name!r} must be at least 1, got {value}")
    return value


def widths(text: str) -> list[int]:
    """``"768,768,512"`` to hidden widths.

    Raises:
        JacpipeError: an empty list, a non-integer or a width below 1.
    """
    try:
        out = [int(w) for w in str(text).split(",") if w.strip()]
    except ValueError:
        raise JacpipeError(f"hidden must be comma-separated widths like 64,64, got {text!r}"
                           ) from None
    if not out or min(out) < 1:
        raise JacpipeError(f"hidden must be comma-separated widths >= 1, got {text!r}")
    return out


def tanh_mlp(sizes: list[int], g: torch.Generator, dt: torch.dtype):  # noqa: ANN201
    """A seeded tanh MLP ``sizes[0] -> ... -> sizes[-1]`` of one point, as a function."""
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        w = torch.randn(b, a, generator=g, dtype=dt).div_(a**0.5)
        layers.append((w, torch.randn(b, generator=g, dtype=dt).mul_(0.1)))

    def u(v: torch.Tensor) -> torch.Tensor:
        for i, (w, b) in enumerate(layers):
            v = w @ v + b
            if i < len(layers) - 1:
                v = torch.tanh(v)
        return v

    return u


def field_in_box(points: int, dim: int, hidden: str, dtype: str, seed: int):  # noqa: ANN201
    """A seeded scalar tanh MLP ``u: R^dim -> R`` and ``points`` points in ``[-1, 1]^dim``.

    Raises:
        JacpipeError: a size below 1, bad widths or dtype.
    """
    positive("points", points)
    positive("dim", dim)
    dt = dtype_of(dtype)
    g = generator(seed)
    net = tanh_mlp([dim, *widths(hidden), 1], g, dt)
    x = torch.rand(points, dim, generator=g, dtype=dt).mul_(2).sub_(1)
    return (lambda v: net(v).reshape(())), x
