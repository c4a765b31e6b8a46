"""``pipeline.maths.kinds``: Hessian and batched rows against autograd."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

from pipeline.maths.engine import (
    batched_rows,
    hessian_rows,
    iter_batched_rows,
    iter_hessian_rows,
    jacobian_rows,
)
from pipeline.problem.problem import build_problem
from tests.maths.kindrefs import (
    BATCHED_JOBS,
    HESSIAN_JOBS,
    assert_close,
    batched_reference,
    hessian_reference,
)
from tests.maths.trust import METHODS, close, point


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("job", sorted(HESSIAN_JOBS))
@pytest.mark.parametrize("method", ["rev", "fwd", "auto"])
def test_hessian_jobs_match_autograd_and_func_hessian(job, dtype, method):
    problem = build_problem(job, {**HESSIAN_JOBS[job], "dtype": dtype})
    ref = hessian_reference(problem)
    n = ref.shape[0]
    bounds = [0, 5, 5, 13, n]  # uneven shards, one empty
    got = torch.cat([hessian_rows(problem.fn, problem.x, a, b, chunk_size=4, method=method)
                     for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    assert_close(got, ref, dtype)
    flat = problem.x.reshape(-1)
    func_ref = torch.func.hessian(lambda t: problem.fn(t.reshape(problem.x.shape)))(flat)
    assert_close(got, func_ref, dtype)


def test_rosenbrock_hessian_is_the_analytic_tridiagonal():
    problem = build_problem("rosenbrock", {"n": 40, "pattern": True})
    x = problem.x
    got = hessian_rows(problem.fn, x, 0, 40, chunk_size=16)
    diag = torch.zeros_like(x)
    diag[:-1] += 1200 * x[:-1] ** 2 - 400 * x[1:] + 2
    diag[1:] += 200
    ref = torch.diag(diag) + torch.diag(-400 * x[:-1], 1) + torch.diag(-400 * x[:-1], -1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-9)
    pattern = torch.from_numpy(problem.sparsity.toarray())
    assert pattern.dtype == torch.bool and torch.equal(pattern, got != 0)
    assert build_problem("rosenbrock", {"n": 40}).sparsity is None  # default: no pattern


def test_trajectory_pattern_covers_the_hessian_and_obstacles_are_active():
    problem = build_problem("trajectory", {"waypoints": 12, "pattern": True})
    h = hessian_reference(problem)
    pattern = torch.from_numpy(problem.sparsity.toarray())
    assert h.shape == (36, 36) and not h[~pattern].any()
    assert (h[pattern] != 0).float().mean() > 0.9  # the pattern is tight
    # The obstacle barrier couples x, y, z of a waypoint: off-diagonal 3x3 entries.
    blocks = h.reshape(12, 3, 12, 3).diagonal(dim1=0, dim2=2)  # (3, 3, 12)
    assert (blocks[0, 1].abs() > 1e-3).any()


def test_hessian_methods_and_ranges():
    problem = build_problem("rosenbrock", {"n": 10})
    starts = [a for a, _ in iter_hessian_rows(problem.fn, problem.x, 1, 10, chunk_size=4)]
    assert starts == [1, 5, 9]
    assert hessian_rows(problem.fn, problem.x, 3, 3).shape == (0, 10)
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_rows(problem.fn, problem.x, 0, 3, method="sideways")
    with pytest.raises(ValueError, match="outside"):
        hessian_rows(problem.fn, problem.x, 0, 11)


def test_benchmark_hand_derived_hessian_is_the_hessian():
    from benchmarks.batched_hessian import hand_hessian, hessian_problem, two_product_rows

    f, x, w = hessian_problem(40, "float64")
    ref = hessian(f, x)
    torch.testing.assert_close(hand_hessian(x, w), ref, rtol=1e-12, atol=1e-12)
    # The benchmark's floor of row methods: the same matrix, blocks that do not divide n.
    torch.testing.assert_close(two_product_rows(x, w, 16), ref, rtol=1e-12, atol=1e-12)
    for method in ("rev", "fwd"):
        torch.testing.assert_close(hessian_rows(f, x, 0, 40, chunk_size=16, method=method),
                                   ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("job", sorted(BATCHED_JOBS))
@pytest.mark.parametrize("method", ["rev", "fwd"])
def test_batched_jobs_match_the_per_sample_loop(job, dtype, method):
    problem = build_problem(job, {**BATCHED_JOBS[job], "dtype": dtype})
    ref = batched_reference(problem)  # (B, m, n)
    b, m, n = ref.shape
    flat_ref = ref.reshape(b * m, n)
    # Shards whose boundaries cut samples (m + 3, ...) and fall on them (2m).
    for bounds in ([0, b * m], [0, m + 3, 2 * m, 2 * m + 1, b * m], [2, 5]):
        parts = [batched_rows(problem.fn, problem.x, a, z, chunk_size=2 * max(m, n),
                              method=method)
                 for a, z in zip(bounds[:-1], bounds[1:], strict=True)]
        assert_close(torch.cat(parts), flat_ref[bounds[0]:bounds[-1]], dtype)
    vmapped = torch.func.vmap(torch.func.jacrev(problem.fn))(problem.x).reshape(b, m, n)
    assert_close(vmapped, ref, dtype)


def test_batched_chunks_are_counted_in_whole_samples():
    problem = build_problem("robot_arm", {"batch": 10})  # m = 12 rows, n = 6 columns
    fn, xs = problem.fn, problem.x

    def blocks(start, stop, chunk, method):
        return [(a, len(blk)) for a, blk in iter_batched_rows(
            fn, xs, start, stop, chunk_size=chunk, method=method)]

    # rev: 30 cotangents -> 2 samples (24 rows) per pass; the cut samples 0 and 8
    # go alone: rows 5..12 of sample 0, then whole samples 1..7, then 96..100.
    assert blocks(5, 100, 30, "rev") == [(5, 7), (12, 24), (36, 24), (60, 24), (84, 12),
                                         (96, 4)]
    # fwd: 30 tangents -> 5 samples (n = 6 JVPs each) per pass.
    assert blocks(0, 120, 30, "fwd") == [(0, 60), (60, 60)]
    # A sample larger than one chunk: its rows in chunks, never over the budget.
    small = blocks(0, 36, 5, "rev")
    assert max(r for _, r in small) <= 5 and sum(r for _, r in small) == 36
    ref = batched_reference(problem).reshape(120, 6)
    torch.testing.assert_close(batched_rows(fn, xs, 7, 31, chunk_size=5), ref[7:31])
    assert batched_rows(fn, xs, 12, 12).shape == (0, 6)
    with pytest.raises(ValueError, match="method must be one of"):
        batched_rows(fn, xs, 0, 3, method="sideways")


def in_float64(t):
    return torch.tanh(t.double()) * 3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", [2, None])
def test_rows_come_back_in_xs_dtype(method, chunk):
    x = point(torch.float32)
    ref = jacobian(in_float64, x)
    assert ref.dtype == torch.float32  # autograd's answer is in x's dtype
    close(jacobian_rows(in_float64, x, 0, 6, chunk_size=chunk, method=method), ref)
    xs = x.reshape(3, 2)
    per_sample = torch.cat([jacobian(in_float64, xs[b]) for b in range(3)])
    close(batched_rows(in_float64, xs, 0, 6, chunk_size=chunk, method=method), per_sample)
    h = hessian_rows(lambda t: in_float64(t).sum(), x, 0, 6, chunk_size=chunk, method=method)
    close(h, hessian(lambda t: in_float64(t).sum(), x))
