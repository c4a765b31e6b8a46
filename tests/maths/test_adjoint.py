"""``pipeline.maths.adjoint``: the forward/reverse adjoint check."""

from __future__ import annotations

import json

import pytest
import torch
from torch.autograd.functional import jacobian

from pipeline.maths.adjoint import ADJOINT_RTOL, AdjointCheck, adjoint_check
from pipeline.maths.checks import ForwardModeWarning
from pipeline.maths.engine import jacobian_rows
from pipeline.problem.problem import build_problem
from tests.maths.trust import DTYPES, close, doubles_its_input, point
from tests.userjobs import OldStyle

#: Every built-in job with small parameters (the adjoint check's false-alarm sweep).
BUILTIN = {
    "banded": {"n": 40},
    "brusselator": {"N": 6},
    "cnn": {"batch": 3, "channels": 2},
    "contact": {},
    "heat": {"N": 6, "pattern": False},
    "mlp": {"n": 30, "m": 20, "hidden": 16},
    "robot_arm": {"batch": 4},
    "rosenbrock": {"n": 20},
    "trajectory": {"waypoints": 6, "obstacles": 2},
}


def under_no_grad(t):
    with torch.no_grad():
        s = t.sum()
    return t * s


def with_hook(t):
    h = t * 2
    if h.requires_grad:  # forward mode never builds a graph: the hook is not there
        h.register_hook(lambda g: g * 3)
    return h.sin()


INDICES = torch.tensor([0, 2, 0, 4, 1])


def padded_embedding(t):
    return torch.nn.functional.embedding(INDICES, t.reshape(5, 2), padding_idx=0).reshape(-1)


class WrongJvp(torch.autograd.Function):
    """sin, whose jvp is twice its backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v):
        return torch.sin(v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        return g * torch.cos(v)

    @staticmethod
    def jvp(ctx, t):
        (v,) = ctx.saved_tensors
        return 2 * t * torch.cos(v)


BROKEN = {
    "no_grad": under_no_grad,
    "hook": with_hook,
    "padding_idx": padded_embedding,
    "custom_jvp": WrongJvp.apply,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_adjoint_check_flags_what_forward_mode_ignores(dtype, case):
    fn = BROKEN[case]
    x = torch.linspace(0.3, 1.7, 10, dtype=dtype)
    # Forward mode really gives another matrix than autograd here ...
    ref = jacobian(fn, x).reshape(-1, 10)
    with pytest.warns(ForwardModeWarning, match="forward mode's rows kept"):  # and says so
        fwd = jacobian_rows(fn, x, 0, ref.shape[0], method="fwd")
    assert (fwd - ref).abs().max() > 1e-2
    close(jacobian_rows(fn, x, 0, ref.shape[0], method="rev"), ref)  # rev is autograd's
    # ... and the check says so, every seed.
    for seed in range(3):
        check = adjoint_check(fn, x, seed=seed)
        assert isinstance(check, AdjointCheck) and not check.agree
        assert check.rel_error > 10 * check.tolerance
        assert "use reverse mode" in check.reason
        json.dumps(check.to_json(), allow_nan=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adjoint_check_flags_broken_hessians_and_batches(dtype):
    x = torch.linspace(0.3, 1.7, 10, dtype=dtype)
    assert not adjoint_check(lambda t: (under_no_grad(t) ** 2).sum(), x, kind="hessian").agree
    assert adjoint_check(lambda t: (t.sin() ** 2).sum(), x, kind="hessian").agree
    xs = x.reshape(5, 2)
    assert not adjoint_check(with_hook, xs, kind="batched").agree
    assert adjoint_check(torch.sin, xs, kind="batched").agree


def test_adjoint_check_reports_a_jvp_that_cannot_run():
    check = adjoint_check(OldStyle.apply, point(torch.float64))
    assert not check.agree and "forward mode cannot run" in check.reason
    assert check.uJv != check.uJv  # NaN: not computed
    wrote = adjoint_check(doubles_its_input, point(torch.float64))
    assert not wrote.agree and "writes into its input" in wrote.reason


def test_adjoint_check_on_nan_derivatives_says_why():
    x = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    check = adjoint_check(torch.sqrt, x)
    assert not check.agree and "not finite" in check.reason


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("job", sorted(BUILTIN))
def test_adjoint_check_never_alarms_on_a_builtin_job(job, dtype):
    problem = build_problem(job, {**BUILTIN[job], "dtype": dtype})
    for seed in range(4):
        check = adjoint_check(problem.fn, problem.x, kind=problem.kind, seed=seed)
        assert check.agree, check.reason
        # far inside the tolerance: rounding, not luck (see NOTE in pipeline/adjoint.py)
        assert check.rel_error <= ADJOINT_RTOL[dtype] / 10


_Y0 = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)


def cdist_rows(t):
    """torch.cdist: its batched backward is wrong (torch.func.jacrev is)."""
    return torch.cdist(t.reshape(-1, 3), _Y0).reshape(-1)


def test_vmap_spot_check_flags_a_wrong_batching_rule_and_passes_the_jobs():
    from pipeline import Problem
    from pipeline.maths.adjoint import vmap_spot_check

    x = torch.linspace(-0.7, 0.9, 15, dtype=torch.float64)
    for problem in (Problem(fn=cdist_rows, x=x), Problem(fn=cdist_rows, x=x.reshape(5, 3),
                                                          kind="batched")):
        spot = vmap_spot_check(problem)
        assert spot is not None and not spot.agree and "without vmap" in spot.reason
        assert len(spot.rows) == 2 and spot.window[0] <= min(spot.rows)
        json.dumps(spot.to_json(), allow_nan=False)
    for job in ("mlp", "rosenbrock", "robot_arm"):
        for dtype in ("float32", "float64"):
            p = build_problem(job, {**BUILTIN[job], "dtype": dtype})
            assert vmap_spot_check(p, seed=3).agree, (job, dtype)
    assert vmap_spot_check(build_problem("poisson", {"points": 4})) is None  # Taylor mode
