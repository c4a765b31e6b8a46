"""``pipeline.maths.params``: rows against ``torch.func.jacrev`` of ``functional_call``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline import Problem
from pipeline.maths.kinds import reference_rows
from pipeline.maths.params import iter_param_rows, param_rows
from pipeline.problem.problem import build_problem
from tests.maths.kindrefs import assert_close


def func_reference(net, xs):
    """``vmap(jacrev(functional_call))`` over the trainable parameters: ``(N, O, P)``."""
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in net.named_buffers()}

    def f(p, x):
        return torch.func.functional_call(net, {**p, **buffers}, (x[None],))[0]

    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, xs)
    n = xs.shape[0]
    return torch.cat([jac[k].reshape(n, jac[k].shape[1], -1) for k in params], dim=2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rows_of_a_cnn_with_batch_norm_match_func_jacrev(dtype):
    problem = build_problem("netparams", {"batch": 3, "channels": 2, "side": 6,
                                          "classes": 4, "dtype": dtype})
    net = problem.fn.module
    ref = func_reference(net, problem.x)
    n, m, p = ref.shape
    bounds = [0, 3, 3, 7, n * m]  # cuts samples, one empty range
    chunks = (None, 2, 5) if dtype == "float64" else (5,)
    for chunk in chunks:  # whole batch, fewer rows than one sample, whole samples
        got = torch.cat([param_rows(problem.fn, problem.x, a, b, chunk_size=chunk)
                         for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        assert_close(got.reshape(n, m, p), ref, dtype)


def test_forward_mode_and_reference_rows_agree_with_func():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 2)).double()
    xs = torch.randn(4, 3, dtype=torch.float64)
    problem = Problem.from_module(net, xs)
    ref = func_reference(net, xs).reshape(8, -1)
    fwd = torch.cat([b for _, b in iter_param_rows(problem.fn, xs, 1, 7, method="fwd",
                                                   chunk_size=40)])
    assert_close(fwd, ref[1:7], "float64")
    rows = [6, 0, 3]
    assert_close(torch.as_tensor(reference_rows(problem, rows)), ref[rows], "float64")
    with pytest.raises(ValueError, match="outside"):
        next(iter_param_rows(problem.fn, xs, 0, 9))
