"""Jobs used by the tests as `tests.userjobs:NAME`: odd shapes and every way to get a job wrong."""

from __future__ import annotations

import torch

from pipeline import Problem


class OldStyle(torch.autograd.Function):
    """``v ** 3`` as an old-style autograd.Function: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return v**3

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        return 3 * v**2 * g


def matrix_io(rows: int = 3, cols: int = 4, dtype: str = "float64", seed: int = 1) -> Problem:
    """A map from a (rows, cols) matrix to a (2, rows, cols) tensor: multi-dim in and out."""
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows * cols, rows * cols, generator=g, dtype=dt) / (rows * cols)
    x = torch.randn(rows, cols, generator=g, dtype=dt)

    def fn(v: torch.Tensor) -> torch.Tensor:
        h = torch.sin(w @ v.reshape(-1)).reshape(rows, cols)
        return torch.stack([h * v, h.exp()])

    return Problem(fn=fn, x=x)


def returns_list() -> Problem:
    return Problem(fn=lambda v: [v], x=torch.ones(3))


def returns_int() -> Problem:
    return Problem(fn=lambda v: (v > 0).long(), x=torch.ones(3))


def integer_input() -> Problem:
    return Problem(fn=lambda v: v * 2, x=torch.arange(4))


def not_a_problem() -> dict:
    return {"fn": None}


def nondeterministic(n: int = 30) -> Problem:
    """Unseeded weights: every worker builds a different function."""
    w = torch.randn(n, n, dtype=torch.float64)
    return Problem(fn=lambda v: torch.tanh(w @ v), x=torch.ones(n, dtype=torch.float64))


def raises_in_shard(n: int = 40, bad_row: int = 25) -> Problem:
    """fn is fine at build time but its backward raises for one row's shard."""

    class Boom(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(v):
            return v.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            raise ValueError("boom: the user's backward failed")

    def fn(v: torch.Tensor) -> torch.Tensor:
        head = Boom.apply(v[bad_row : bad_row + 1])
        return torch.cat([v[:bad_row] * 2, head, v[bad_row + 1 :] * 2])

    return Problem(fn=fn, x=torch.ones(n, dtype=torch.float64))


def tall(n: int = 4, m: int = 400, dtype: str = "float64") -> Problem:
    """A tall Jacobian (m >> n): --method auto takes forward mode."""
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    g = torch.Generator().manual_seed(3)
    w = torch.randn(m, n, generator=g, dtype=torch.float64).to(dt)
    return Problem(fn=lambda v: torch.tanh(w @ v), x=torch.linspace(-1, 1, n, dtype=dt))


def tall_no_grad(n: int = 4, m: int = 400, dtype: str = "float64") -> Problem:
    """A tall Jacobian whose second term is computed under torch.no_grad.

    Reverse mode (autograd) drops that term's derivative; forward mode
    (torch.func.jvp) keeps it: the modes disagree, and autograd's answer is
    the reference.
    """
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    g = torch.Generator().manual_seed(4)
    w = torch.randn(m, n, generator=g, dtype=torch.float64).to(dt)

    def fn(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            frozen = 10 * torch.sin(w @ v)
        return torch.tanh(w @ v) + frozen

    return Problem(fn=fn, x=torch.linspace(-1, 1, n, dtype=dt))


def custom_backward(n: int = 12) -> Problem:
    """``2 v`` with a hand-written backward scaled by ``$JACPIPE_TEST_BACKWARD_SCALE`` (1.0).

    Changing the variable changes only the derivative, as an edit of a custom
    backward would: fn(x) is the same.
    """
    import os

    scale = float(os.environ.get("JACPIPE_TEST_BACKWARD_SCALE", "1.0"))

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return 2 * v

        @staticmethod
        def backward(ctx, g):
            return 2 * scale * g

    return Problem(fn=Twice.apply, x=torch.linspace(0, 1, n, dtype=torch.float64))


def branchy(n: int = 40) -> Problem:
    """Python control flow on a value of x: global sparsity detection must refuse it."""

    def fn(v: torch.Tensor) -> torch.Tensor:
        if v.sum() > 0:
            return torch.sin(v) * v.roll(1)
        return torch.cos(v)

    return Problem(fn=fn, x=torch.linspace(0.1, 1, n, dtype=torch.float64))


def writes_input(n: int = 6, dtype: str = "float64") -> Problem:
    """fn scales its argument in place: autograd.functional refuses it, so must jacpipe."""
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]

    def fn(v: torch.Tensor) -> torch.Tensor:
        v.mul_(2)
        return v * v

    return Problem(fn=fn, x=torch.linspace(1, 2, n, dtype=dt))


def ragged_samples(batch: int = 12, dtype: str = "float64") -> Problem:
    """A per-sample fn whose output size depends on the sample (sample 9 has 2 more)."""
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    xs = torch.linspace(0, 1, batch * 3, dtype=dt).reshape(batch, 3)

    def fn(v: torch.Tensor) -> torch.Tensor:
        extra = 2 if bool(v[0] > 0.77) and bool(v[0] < 0.8) else 0
        return torch.cat([torch.sin(v), v[:1].repeat(extra)])

    return Problem(fn=fn, x=xs, kind="batched")


def nan_at_x(n: int = 5, dtype: str = "float64") -> Problem:
    """fn(x) holds a NaN (log of a negative entry) while its Jacobian rows are fine elsewhere."""
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    return Problem(fn=lambda v: torch.log(v) * 2, x=torch.linspace(-1, 1, n, dtype=dt))


def old_style_hessian(n: int = 6, dtype: str = "float64") -> Problem:
    """A scalar fn through an old-style autograd.Function with a double-differentiable backward."""
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    return Problem(fn=lambda v: OldStyle.apply(v).sum() + (v[:-1] * v[1:]).sum(),
                   x=torch.linspace(0.5, 1.5, n, dtype=dt), kind="hessian")


def taylor_field(points: int = 24, order: int = 4, outputs: int = 2) -> Problem:
    """The ``order``-th directional derivative of a vector field R^3 -> R^outputs per point."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(outputs, 3, generator=g, dtype=torch.float64)
    x = torch.rand(points, 3, generator=g, dtype=torch.float64)
    return Problem(fn=lambda v: torch.sin(w @ v) * torch.exp(v.sum() / 3), x=x, kind="taylor",
                   operator={"order": order, "direction": [1.0, -0.5, 0.25]})


def exits_in_build(code: int = 3) -> Problem:
    """A ``build()`` that calls ``sys.exit(code)`` instead of returning a problem."""
    import sys

    sys.exit(code)


def backward_raises_for_some_rows(n: int = 6) -> Problem:
    """``2 x`` whose backward raises when row 0 of the pullback is asked for (some rows only)."""

    class Doubled(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(v: torch.Tensor) -> torch.Tensor:
            return 2 * v

        @staticmethod
        def setup_context(ctx: object, inputs: object, output: object) -> None:
            pass

        @staticmethod
        def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
            if bool(grad[..., 0].ne(0).any()):
                raise ValueError("no derivative for row 0")
            return 2 * grad

    return Problem(fn=Doubled.apply, x=torch.arange(1.0, n + 1, dtype=torch.float64))


def waits_in_build(ready: str = "") -> Problem:
    """A ``build()`` that touches ``ready`` and then waits (a test sends SIGTERM meanwhile)."""
    import time

    open(ready, "w").close()
    time.sleep(120)
    return Problem(fn=torch.tanh, x=torch.ones(3, dtype=torch.float64))


def random_windows(size: int = 8) -> Problem:
    """``F.fractional_max_pool2d``: its windows are drawn at random on every call."""
    import torch.nn.functional as F

    def fn(v: torch.Tensor) -> torch.Tensor:
        return F.fractional_max_pool2d(v.reshape(1, 1, size, size), 2,
                                       output_size=size // 2).reshape(-1)

    x = torch.linspace(-1, 1, size * size, dtype=torch.float64)
    return Problem(fn=fn, x=x)
