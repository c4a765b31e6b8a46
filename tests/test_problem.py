"""Loading jobs, typed parameters, validation and the fingerprint."""

from __future__ import annotations

import pytest
import torch

from pipeline import Problem
from pipeline.core.errors import JacpipeError
from pipeline.core.fingerprint import check_fingerprint
from pipeline.problem.problem import (
    build_problem,
    builtin_jobs,
    fingerprint,
    parse_params,
    resolve_builder,
    validate,
)


def test_builtin_jobs_are_listed_and_deterministic():
    names = builtin_jobs()
    assert {"mlp", "robot_arm", "heat"} <= set(names)
    for name, params in [("mlp", {"n": 20, "m": 10, "hidden": 8}), ("robot_arm", {}),
                         ("heat", {"N": 5})]:
        a, b = build_problem(name, params), build_problem(name, params)
        shapes = validate(a)
        check_fingerprint(fingerprint(a, shapes), fingerprint(b, validate(b)))
        assert torch.equal(a.x, b.x)


def test_parameters_are_typed_from_defaults():
    builder = resolve_builder("mlp")
    got = parse_params(builder, ["n=12", "activation=relu", "dtype=float64"])
    assert got == {"n": 12, "activation": "relu", "dtype": "float64"}
    assert isinstance(got["n"], int)
    heat = parse_params(resolve_builder("heat"), ["dt=0.5", "pattern=false"])
    assert heat == {"dt": 0.5, "pattern": False}


@pytest.mark.parametrize("pairs,match", [
    (["nn=3"], "unknown parameter 'nn'"),
    (["n=three"], "expected int"),
    (["n"], "NAME=VALUE"),
    (["=3"], "NAME=VALUE"),
])
def test_bad_parameters(pairs, match):
    with pytest.raises(JacpipeError, match=match):
        parse_params(resolve_builder("mlp"), pairs)


@pytest.mark.parametrize("spec,match", [
    ("nope", "unknown job 'nope'"),
    ("no_such_module_xyz:build", "cannot import"),
    ("tests.userjobs:missing", "has no function"),
    ("tests.userjobs:returns_list", "must return a torch.Tensor"),
    ("tests.userjobs:returns_int", "floating output"),
    ("tests.userjobs:integer_input", "floating input"),
    ("tests.userjobs:not_a_problem", "must return pipeline.Problem"),
])
def test_bad_jobs_are_one_clear_error(spec, match):
    with pytest.raises(JacpipeError, match=match):
        build_problem(spec, {})


def test_nondeterministic_job_is_detected():
    a = build_problem("tests.userjobs:nondeterministic", {})
    b = build_problem("tests.userjobs:nondeterministic", {})
    with pytest.raises(JacpipeError, match="nondeterministic job: fn"):
        check_fingerprint(fingerprint(a, validate(a)), fingerprint(b, validate(b)))


def test_fingerprint_names_a_different_x():
    p = Problem(fn=torch.sin, x=torch.ones(3, dtype=torch.float64))
    q = Problem(fn=torch.sin, x=torch.ones(3, dtype=torch.float64) * 2)
    with pytest.raises(JacpipeError, match="x differs"):
        check_fingerprint(fingerprint(p, validate(p)), fingerprint(q, validate(q)))


def test_shapes_of_each_kind():
    s = validate(build_problem("tests.userjobs:matrix_io", {"rows": 2, "cols": 3}))
    assert (s.in_shape, s.out_shape, s.m, s.n, s.total_rows) == ((2, 3), (2, 2, 3), 12, 6, 12)
    b = validate(build_problem("robot_arm", {"batch": 5}))
    assert (b.kind, b.batch, b.m, b.n, b.total_rows) == ("batched", 5, 12, 6, 60)
    h = validate(Problem(fn=lambda v: (v**2).sum(), x=torch.ones(4), kind="hessian"))
    assert (h.m, h.n) == (4, 4)
    with pytest.raises(JacpipeError, match="scalar"):
        validate(Problem(fn=lambda v: v, x=torch.ones(4), kind="hessian"))
