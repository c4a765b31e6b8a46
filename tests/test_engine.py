"""The engine against torch's references, in float32 and float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

from pipeline.maths.engine import (
    VmapFallbackWarning,
    batched_rows,
    hessian_rows,
    iter_jacobian_rows,
    jacobian_rows,
)
from pipeline.problem.problem import build_problem
from tests.userjobs import OldStyle, matrix_io

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}
JOBS = {
    "mlp": {"n": 40, "m": 30, "hidden": 16},
    "robot_arm": {},
    "heat": {"N": 6, "pattern": False},
}


def flat_reference(fn, x):
    return jacobian(fn, x).reshape(-1, x.numel())


def assert_close(got, ref, dtype):
    assert got.dtype == ref.dtype == dtype
    torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("job", sorted(JOBS))
@pytest.mark.parametrize("method", ["rev", "fwd"])
def test_every_job_matches_autograd_and_jacrev(job, dtype, method):
    problem = build_problem(job, {**JOBS[job], "dtype": dtype})
    fn, x = problem.fn, problem.x
    ref = flat_reference(fn, x)
    got = jacobian_rows(fn, x, 0, ref.shape[0], chunk_size=7, method=method)
    assert_close(got, ref, x.dtype)
    jr = torch.func.jacrev(lambda t: fn(t.reshape(x.shape)).reshape(-1))(x.reshape(-1))
    assert_close(got, jr, x.dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_multidimensional_input_and_output(dtype):
    problem = matrix_io(rows=3, cols=5, dtype=dtype)
    ref = flat_reference(problem.fn, problem.x)
    assert ref.shape == (2 * 3 * 5, 15)
    for method in ("rev", "fwd"):
        got = jacobian_rows(problem.fn, problem.x, 0, 30, chunk_size=4, method=method)
        assert_close(got, ref, problem.x.dtype)


@pytest.mark.parametrize("bounds", [[0, 30], [0, 7, 30], [0, 1, 2, 29, 30], [0, 10, 20, 30],
                                    [0, 13, 13, 30]])
def test_shards_concatenate_to_the_whole_matrix(bounds):
    problem = matrix_io(rows=3, cols=5)
    ref = flat_reference(problem.fn, problem.x)
    parts = [jacobian_rows(problem.fn, problem.x, a, b, chunk_size=3)
             for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    torch.testing.assert_close(torch.cat(parts), ref, rtol=1e-12, atol=1e-13)


def test_empty_range_and_bad_range():
    problem = matrix_io()
    for method in ("rev", "fwd"):
        empty = jacobian_rows(problem.fn, problem.x, 5, 5, chunk_size=4, method=method)
        assert empty.shape == (0, problem.x.numel())
    with pytest.raises(ValueError, match="outside"):
        jacobian_rows(problem.fn, problem.x, 0, 10**6)


def test_chunks_are_streamed_in_order():
    problem = matrix_io()
    starts = [a for a, _ in iter_jacobian_rows(problem.fn, problem.x, 3, 20, chunk_size=5)]
    assert starts == [3, 8, 13, 18]


class DataDependentBackward(torch.autograd.Function):
    """A backward with Python control flow on tensor values: vmap cannot batch it."""

    @staticmethod
    def forward(v):
        return torch.sin(v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        if g.abs().sum() > 0:  # data-dependent: fails under vmap
            return torch.cos(v) * g
        return g * 0


def with_item(v):
    return v * v.sum().item() + v**2


def inplace_into_fresh(v):
    out = torch.zeros(v.shape[0] + 1, dtype=v.dtype)
    out[0] = v[0] * v[1]
    out[1:] = v.sin()
    return out


@pytest.mark.parametrize("fn,falls_back", [
    (OldStyle.apply, True),
    (DataDependentBackward.apply, True),
    (with_item, False),
    (inplace_into_fresh, False),
])
def test_non_vectorisable_functions_fall_back_with_one_warning(fn, falls_back):
    x = torch.linspace(0.3, 1.7, 6, dtype=torch.float64)
    ref = jacobian(fn, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = jacobian_rows(fn, x, 0, ref.shape[0], chunk_size=2)
    fallbacks = [w for w in caught if issubclass(w.category, VmapFallbackWarning)]
    assert len(fallbacks) == (1 if falls_back else 0)
    torch.testing.assert_close(got, ref.reshape(ref.shape[0], -1), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["rev", "fwd"])
def test_hessian_rows_match_autograd_hessian(dtype, method):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 8, generator=g, dtype=dtype)
    x = torch.randn(2, 4, generator=g, dtype=dtype)

    def f(v):
        return torch.logsumexp(torch.tanh(w @ v.reshape(-1)), 0) + 0.5 * (v**2).sum()

    ref = hessian(f, x).reshape(8, 8)
    got = torch.cat([hessian_rows(f, x, 0, 3, chunk_size=2, method=method),
                     hessian_rows(f, x, 3, 8, chunk_size=2, method=method)])
    assert_close(got, ref, dtype)


def _chain(q):
    c = torch.cumsum(q, -1)
    return torch.stack([torch.cos(c).sum(-1), torch.sin(c).sum(-1), c[..., -1]])


_W = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
PER_SAMPLE_FNS = {  # name: (fn of one sample, sample shape)
    "chain": (_chain, (6,)),
    "robot_arm": (build_problem("robot_arm", {"batch": 1}).fn, (6,)),
    "scalar output": (lambda x: (x**3).sum(), (3, 2)),
    "matrix output, float32": (lambda x: torch.outer(torch.tanh(x), x[:2]).float(), (4,)),
    "scalar samples": (lambda x: torch.stack([x * x, torch.sin(x)]), ()),
    "partly constant": (lambda x: torch.stack([x.sum(), torch.ones((), dtype=x.dtype)]), (3,)),
    "matrix input": (lambda x: torch.tanh(_W @ x.reshape(-1)), (3, 2)),
}


@pytest.mark.parametrize("method", ["rev", "fwd"])
@pytest.mark.parametrize("name", sorted(PER_SAMPLE_FNS))
def test_per_sample_rows_are_bitwise_those_of_vmap_jacrev_and_jacfwd(name, method):
    """engine NOTE: [Per-sample Jacobians without jacrev and jacfwd]: the same numbers."""
    fn, shape = PER_SAMPLE_FNS[name]
    xs = torch.randn(7, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    jac = torch.func.jacfwd if method == "fwd" else torch.func.jacrev
    want = torch.func.vmap(jac(fn))(xs).reshape(7, -1).double()  # rows in xs's dtype
    m = want.shape[1] // max(xs[0].numel(), 1)
    got = batched_rows(fn, xs, 0, 7 * m, method=method)
    assert got.shape == (7 * m, xs[0].numel()) and got.dtype == torch.float64
    assert torch.equal(got.reshape(7, -1), want)
    # chunked, and a range that cuts samples: each row is the same
    cut = batched_rows(fn, xs, 1, 7 * m - 1, chunk_size=2 * (m if method == "rev" else 6),
                       method=method)
    torch.testing.assert_close(cut, want.reshape(7 * m, -1)[1 : 7 * m - 1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["rev", "fwd"])
def test_whole_batch_rows_learn_m_from_their_own_pass(method):
    """NOTE: [Per-sample rows: m from the pass itself]: no forward pass on xs[0] first."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    xs = torch.randn(5, 3, generator=g, dtype=torch.float64)
    calls = []

    def f(v):
        calls.append(tuple(v.shape))
        return torch.tanh(w @ v)

    ref = torch.cat([jacobian(f, xs[b]) for b in range(5)])  # (5*4, 3)
    calls.clear()
    assert_close(batched_rows(f, xs, 0, 20, method=method), ref, torch.float64)
    assert calls == [(3,)]  # fn traced once, inside the vectorised pass
    # B * 2 rows of m = 4: the pass learns m, then the rows asked are computed
    assert_close(batched_rows(f, xs, 0, 10, method=method), ref[:10], torch.float64)
    with pytest.raises(ValueError, match=r"row range \[0, 25\) outside \[0, 20\)"):
        batched_rows(f, xs, 0, 25, method=method)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["rev", "fwd"])
def test_batched_rows_are_per_sample_never_cross_terms(dtype, method):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 4, generator=g, dtype=dtype)
    xs = torch.randn(5, 4, generator=g, dtype=dtype)

    def f(v):
        return torch.tanh(w @ v)

    ref = torch.cat([jacobian(f, xs[b]) for b in range(5)])  # (5*3, 4)
    for a, b in [(0, 15), (2, 11), (4, 5), (7, 7)]:
        got = batched_rows(f, xs, a, b, chunk_size=4, method=method)
        assert_close(got, ref[a:b], dtype)
