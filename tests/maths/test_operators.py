"""Per-point operators and third-derivative rows (pipeline.maths.operators) against torch.func."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import JacpipeError, Problem
from pipeline.core.pairs import pair_count, pair_of_row
from pipeline.maths import operators
from pipeline.maths.operators import (
    iter_third_rows,
    point_columns,
    point_reference_rows,
    third_reference,
    third_reference_rows,
)
from pipeline.problem.problem import validate


def _mlp(d: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(16, d, generator=g, dtype=torch.float64) / d**0.5
    w2 = torch.randn(k, 16, generator=g, dtype=torch.float64) / 4

    def fn(t: torch.Tensor) -> torch.Tensor:
        out = w2 @ torch.tanh(w1 @ t) + torch.sin(t).sum()
        return out.reshape(()) if k == 1 else out

    return fn


def _points(p: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(p, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _collect(problem: Problem, chunk: int | None) -> dict[str, np.ndarray]:
    cols: dict[str, list] = {}
    for _, block in point_columns(problem, 0, problem.x.shape[0], chunk_size=chunk):
        for name, t in block.items():
            cols.setdefault(name, []).append(t.numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


@pytest.mark.parametrize("kind,operator", [
    ("laplacian", None),
    ("laplacian", {"weights": [0.5, 1.0, 2.0, 3.0]}),
    ("laplacian", {"weights": (np.eye(4) + 0.1).tolist()}),
    ("biharmonic", None),
    ("taylor", {"order": 3, "direction": [1.0, -0.5, 0.25, 2.0]}),
    ("taylor", {"order": 5, "direction": [0.3, 0.1, -1.0, 0.7]}),
])
@pytest.mark.parametrize("k", [1, 3])
def test_exact_per_point_operators_equal_nested_torch_func(kind, operator, k):
    fn, pts = _mlp(4, k), _points(9, 4)
    problem = Problem(fn, pts, kind=kind, operator=operator)
    shapes = validate(problem)
    assert (shapes.m, shapes.n, shapes.total_rows) == (1, k, 9)
    got = _collect(problem, chunk=4)
    ref = point_reference_rows(problem, np.arange(9))
    np.testing.assert_allclose(got["values"], ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    values = torch.stack([fn(p) for p in pts]).reshape(9, -1).numpy()
    np.testing.assert_allclose(got["value"], values, rtol=1e-12)
    assert "stderr" not in got


@pytest.mark.parametrize("kind", ["laplacian", "biharmonic"])
def test_stochastic_rows_do_not_depend_on_the_chunking(kind):
    problem = Problem(_mlp(5, 2), _points(11, 5), kind=kind,
                      operator={"samples": 6, "seed": 3})
    whole, pieces = _collect(problem, None), _collect(problem, 3)
    for name in ("values", "value", "stderr"):  # the same directions; kernels of other sizes
        np.testing.assert_allclose(whole[name], pieces[name], rtol=1e-12, atol=1e-13)
    other = _collect(Problem(problem.fn, problem.x, kind=kind,
                             operator={"samples": 6, "seed": 4}), None)
    assert not np.array_equal(other["values"], whole["values"])  # the seed matters


def test_stochastic_laplacian_at_d50_is_within_three_standard_errors():
    fn, pts = _mlp(50, 1, seed=2), _points(200, 50, seed=5)
    problem = Problem(fn, pts, kind="laplacian", operator={"samples": 64, "seed": 0})
    got = _collect(problem, 50)
    exact = point_reference_rows(Problem(fn, pts, kind="laplacian"), np.arange(200))
    z = np.abs(got["values"] - exact) / got["stderr"]
    assert (z <= 3).mean() >= 0.98  # Hutchinson's errors have heavier tails than a normal's
    assert z.max() < 10


def test_third_rows_equal_jacrev_of_jacrev_of_jacrev_at_n30():
    from jobs.lennard_jones import build

    problem = build(atoms=10)
    n = problem.x.numel()
    assert n == 30
    rows = np.concatenate([b.numpy() for _, b in
                           iter_third_rows(problem.fn, problem.x, 0, pair_count(n),
                                           chunk_size=64)])
    ref = third_reference(problem)
    np.testing.assert_allclose(rows, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    some = np.array([0, 7, 100, pair_count(n) - 1])
    np.testing.assert_allclose(third_reference_rows(problem, some), ref[some], rtol=1e-10,
                               atol=1e-10 * np.abs(ref).max())


def test_third_rows_of_a_range_match_the_whole():
    fn = _mlp(6, 1)
    x = _points(1, 6)[0]
    whole = np.concatenate([b.numpy() for _, b in iter_third_rows(fn, x, 0, 21)])
    part = np.concatenate([b.numpy() for _, b in iter_third_rows(fn, x, 5, 17, chunk_size=4)])
    np.testing.assert_allclose(part, whole[5:17], rtol=1e-12, atol=1e-14)
    with pytest.raises(JacpipeError, match="outside the 21 pairs"):
        next(iter_third_rows(fn, x, 0, 22))


@pytest.mark.parametrize("problem,match", [
    (Problem(_mlp(3, 2), _points(1, 3)[0], kind="third"), "needs a scalar fn"),
    (Problem(_mlp(3, 1), _points(1, 3)[0], kind="laplacian"), r"points x of shape \(P, D\)"),
    (Problem(_mlp(3, 1), _points(2, 3).reshape(2, 3, 1), kind="laplacian"), "shape \\(P, D\\)"),
    (Problem(_mlp(3, 1), _points(4, 3), kind="taylor", operator={"order": 2, "direction": [1.0] * 3,
                                                               "samples": 8}),
     "samples needs a stochastic operator"),
    (Problem(_mlp(3, 1), _points(4, 3), kind="taylor", operator={"order": 2}),
     "needs operator options order"),
    (Problem(_mlp(3, 1), _points(4, 3), kind="laplacian", operator={"weights": [1.0, 2.0]}),
     "weights must be finite numbers of shape"),
    (Problem(_mlp(3, 1), _points(4, 3), kind="biharmonic", operator={"samples": 1}),
     "samples must be an integer >= 2"),
    (Problem(_mlp(3, 1), _points(1, 3)[0], kind="jacobian", operator={"samples": 4}),
     "samples needs a stochastic operator"),
])
def test_bad_operator_problems_are_refused_in_one_line(problem, match):
    with pytest.raises(JacpipeError, match=match) as info:
        validate(problem)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("pattern", ["known", "auto"])
def test_third_rows_skip_pairs_outside_the_hessian_pattern(pattern, monkeypatch):
    from jobs.lennard_jones import build
    from pipeline.runner import worker

    problem = build(atoms=8, cutoff=1.6, pattern=pattern)
    plain = build(atoms=8, cutoff=1.6)
    n = problem.x.numel()
    hp = worker.hessian_pattern(problem)
    assert hp is not None and hp.shape == (n, n) and 0 < hp.nnz < n * n
    computed = []
    real = operators._mixed_rows

    def counting(rows_of, flat, ej, ek):
        computed.append(len(ej))
        return real(rows_of, flat, ej, ek)

    monkeypatch.setattr(operators, "_mixed_rows", counting)
    rows = np.concatenate([b.numpy() for _, b in iter_third_rows(
        problem.fn, problem.x, 0, pair_count(n), chunk_size=100, pattern=hp)])
    monkeypatch.undo()
    j, k = pair_of_row(np.arange(pair_count(n)), n)
    assert sum(computed) == int((np.asarray(hp[j, k]).reshape(-1) != 0).sum()) < pair_count(n)
    ref = third_reference(plain)
    np.testing.assert_allclose(rows, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())


def test_third_takes_only_a_hessian_shaped_pattern():
    from jobs.lennard_jones import build

    problem = build(atoms=3)
    with pytest.raises(JacpipeError, match=r"Hessian's sparsity pattern, shape \(9, 9\)"):
        validate(Problem(problem.fn, problem.x, kind="third", sparsity=np.eye(3)))
    with pytest.raises(JacpipeError, match="takes sparsity 'auto'"):
        validate(Problem(problem.fn, problem.x, kind="third", sparsity="auto-local"))


def test_the_transforms_are_public_names_of_pipeline():
    import pipeline
    from pipeline.maths import taylor as module

    assert {"taylor", "laplacian", "biharmonic"} <= set(pipeline.__all__)
    for name in ("taylor", "laplacian", "biharmonic"):
        assert getattr(pipeline, name) is getattr(module, name)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    quartic = lambda t: (t**4).sum()  # noqa: E731
    assert float(pipeline.laplacian(quartic)(x)) == 60.0  # 12 (1 + 4)
    assert float(pipeline.biharmonic(quartic)(x)) == 48.0  # 24 + 24


def test_a_weighted_stochastic_laplacian_estimates_tr_c_h():
    fn, pts = _mlp(4, 1, seed=3), _points(20, 4, seed=4)
    c = (np.eye(4) + 0.2).tolist()
    est = _collect(Problem(fn, pts, kind="laplacian",
                           operator={"weights": c, "samples": 400, "seed": 1}), 7)
    exact = point_reference_rows(Problem(fn, pts, kind="laplacian", operator={"weights": c}),
                                 np.arange(20))
    assert (np.abs(est["values"] - exact) / est["stderr"]).max() < 4.5


@pytest.mark.parametrize("kind,operator", [("laplacian", None), ("biharmonic", None),
                                           ("laplacian", {"samples": 3, "seed": 1})])
def test_a_runs_compile_mode_reaches_the_taylor_passes(monkeypatch, kind, operator):
    """``--compile on`` compiles the per-point Taylor passes, ``off`` never does; same values."""
    from pipeline.maths import compiled

    built = []

    def compile_(fn):
        built.append(fn)
        return fn

    monkeypatch.setattr(compiled, "_compile", compile_)
    fn = _mlp(3, 2)
    pts = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    problem = Problem(fn, pts, kind=kind, operator=operator)
    off = dict(point_columns(problem, 0, 5, compile="off"))[0]
    assert built == []
    on = dict(point_columns(problem, 0, 5, compile="on"))[0]
    assert built, "compile='on' never reached the Taylor pass"
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=1e-12, atol=1e-12)
