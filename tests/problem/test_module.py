"""``pipeline.problem.module``: ``Problem.from_module``, its refusals and its fingerprint."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from pipeline import JacpipeError, Problem
from pipeline.core.fingerprint import FingerprintMismatch, check_fingerprint
from pipeline.problem.problem import build_problem, fingerprint, validate


def _net(dtype=torch.float64, *, bn=True):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6), nn.Tanh()] + ([nn.BatchNorm1d(6)] if bn else []) + [
        nn.Linear(6, 3)]
    return nn.Sequential(*layers).to(dtype)


def test_shapes_columns_are_the_parameters_and_the_layout_is_fingerprinted():
    net = _net().eval()
    net[0].bias.requires_grad_(False)  # frozen: a constant, not a column
    problem = Problem.from_module(net, torch.randn(5, 4, dtype=torch.float64))
    shapes = validate(problem)
    p = sum(t.numel() for t in net.parameters() if t.requires_grad)
    assert (shapes.kind, shapes.batch, shapes.m, shapes.n) == ("params", 5, 3, p)
    assert shapes.full_shape == (5, 3, p)
    facts = fingerprint(problem, shapes)["parameters"]
    names = [row["name"] for row in facts["layout"]]
    assert names == [n for n, t in net.named_parameters() if t.requires_grad]
    assert [row["offset"] for row in facts["layout"]] == [0, 24, 30, 36, 54]
    # the problem is a snapshot: a later edit of the module does not change it
    y = problem.fn(problem.x[0])
    with torch.no_grad():
        net[3].weight.add_(1.0)
    torch.testing.assert_close(problem.fn(problem.x[0]), y)


def test_a_pickled_problem_has_the_same_fingerprint_and_other_weights_are_refused():
    problem = Problem.from_module(_net().eval(), torch.randn(3, 4, dtype=torch.float64))
    expected = fingerprint(problem, validate(problem))
    copy = pickle.loads(pickle.dumps(problem))
    check_fingerprint(expected, fingerprint(copy, validate(copy)))
    other = _net().eval()
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3
    changed = Problem.from_module(other, problem.x)
    with pytest.raises(FingerprintMismatch) as err:
        check_fingerprint(expected, fingerprint(changed, validate(changed)))
    assert err.value.field in ("y", "parameters")


@pytest.mark.parametrize("make, match", [
    (lambda: _net(), "training mode"),  # batch norm in train mode
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.1)).double(), "model.eval"),
    (lambda: _net(torch.float32).eval(), "convert one of them"),
    (lambda: nn.Sequential(nn.Linear(4, 3).double().requires_grad_(False)), "nothing to"),
    (lambda: (lambda t: t), "torch.nn.Module"),
])
def test_refusals_are_one_line(make, match):
    with pytest.raises(JacpipeError, match=match) as err:
        Problem.from_module(make(), torch.randn(3, 4, dtype=torch.float64))
    assert "\n" not in str(err.value)


def test_train_mode_without_mode_dependent_layers_is_accepted_and_wrt_inputs_is_batched():
    net = _net(bn=False)  # training mode, but nothing in it depends on the mode
    xs = torch.randn(3, 4, dtype=torch.float64)
    assert validate(Problem.from_module(net, xs)).kind == "params"
    batched = Problem.from_module(net, xs, wrt="inputs")
    assert (validate(batched).kind, validate(batched).n) == ("batched", 4)
    with pytest.raises(JacpipeError, match="wrt must be"):
        Problem.from_module(net, xs, wrt="weights")


def test_a_plain_fn_with_kind_params_is_refused():
    with pytest.raises(JacpipeError, match="Problem.from_module"):
        validate(Problem(fn=torch.sin, x=torch.zeros(2, 3), kind="params"))


def test_the_netparams_job_is_deterministic():
    a, b = build_problem("netparams", {"batch": 2}), build_problem("netparams", {"batch": 2})
    check_fingerprint(fingerprint(a, validate(a)), fingerprint(b, validate(b)))
