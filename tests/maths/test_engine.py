"""``pipeline.maths.engine``: rows by reverse and forward mode, chunks, fallbacks, inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

from pipeline import Problem
from pipeline.core.errors import JacpipeError
from pipeline.maths import engine
from pipeline.maths.engine import (
    InputWriteError,
    SampleShapeError,
    VmapFallbackWarning,
    batched_rows,
    hessian_rows,
    iter_jacobian_rows,
    jacobian_rows,
)
from pipeline.maths.kinds import iter_rows
from pipeline.problem.problem import build_problem
from tests.maths.trust import (
    DTYPES,
    METHODS,
    ClearsItsGrad,
    DoubledUnderVmap,
    close,
    doubles_its_input,
    old_style_chain,
    point,
    with_item_chain,
)
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
    # autograd records an old-style Function; its backward vectorises (NOTE: [Rows by
    # plain autograd under vmap]): rows in one pass, checked against the unbatched one
    (OldStyle.apply, False),
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
    # fn traced once inside the vectorised pass, and once more by the call's own
    # check (NOTE: [Checks on every engine call]): a sample's row without vmap
    # (rev) or one vectorised VJP (fwd); never a pass on xs[0] to learn m first
    assert calls == [(3,), (3,)]
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


def _mlp(n: int, m: int, h: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(h, n, generator=g, dtype=dtype) / n**0.5
    w2 = torch.randn(m, h, generator=g, dtype=dtype) / h**0.5
    return (lambda v: w2 @ torch.tanh(w1 @ v)), torch.randn(n, generator=g, dtype=dtype)


def test_intermediates_count_per_row_memory_not_saved_weights():
    n, m, h = 300, 200, 64
    fn, x = _mlp(n, m, h)
    # x.reshape (n), w1 @ v (h), tanh (h), w2 @ . (m): what one cotangent row carries.
    assert engine.intermediate_numel(fn, x) == n + 2 * h + m
    # autograd saves both weights: counting those per row would be ~150x too many.
    assert engine.intermediate_numel(fn, x) * 50 < 2 * n * h


def test_forward_mode_runs_no_extra_forward_pass():
    fn, x = _mlp(8, 50, 16)
    calls = 0

    def counted(v):
        nonlocal calls
        calls += 1
        return fn(v)

    rows = engine.jacobian_rows(counted, x, 10, 40, method="fwd")
    # one vmapped JVP pass over all 8 columns, and the forward+backward pass of
    # the call's own check (NOTE: [Checks on every engine call])
    assert calls == 2
    torch.testing.assert_close(rows, torch.func.jacfwd(fn)(x)[10:40])


def test_forward_mode_checks_the_range_and_allows_empty_ones():
    fn, x = _mlp(4, 6, 3)
    assert engine.jacobian_rows(fn, x, 3, 3, method="fwd").shape == (0, 4)
    with pytest.raises(ValueError, match="outside"):
        engine.jacobian_rows(fn, x, 0, 7, method="fwd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_rows_keep_the_blocks_layout_and_values(dtype):
    fn, x = _mlp(40, 30, 8, dtype)
    ref = torch.func.jacrev(fn)(x)
    one = engine.jacobian_rows(fn, x, 0, 30)
    chunked = engine.jacobian_rows(fn, x, 0, 30, chunk_size=7)
    torch.testing.assert_close(one, ref)
    torch.testing.assert_close(chunked, ref)
    # `w @ v` layers give column-major blocks; the result keeps that order
    # instead of transposing every block (as torch.cat would).
    assert one.stride() == chunked.stride() == (1, 30)
    sub = engine.jacobian_rows(fn, x, 5, 23, chunk_size=4)
    torch.testing.assert_close(sub, ref[5:23])


def test_row_major_blocks_give_a_row_major_result():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 9, generator=g)
    fn = lambda v: torch.nn.functional.linear(torch.sin(v), w)  # noqa: E731
    x = torch.randn(9, generator=g)
    out = engine.jacobian_rows(fn, x, 0, 12, chunk_size=5)
    assert out.is_contiguous()
    torch.testing.assert_close(out, torch.func.jacrev(fn)(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", [1, None])
def test_writes_into_the_input_are_refused_and_the_input_is_untouched(dtype, method, chunk):
    x = point(dtype, 3)
    before = x.clone()
    # autograd.functional refuses it too: jacpipe cannot give another answer.
    with pytest.raises(RuntimeError, match="in-place"):
        jacobian(doubles_its_input, x)
    calls = [
        lambda: jacobian_rows(doubles_its_input, x, 0, 3, chunk_size=chunk, method=method),
        lambda: hessian_rows(lambda t: doubles_its_input(t).sum(), x, 0, 3, chunk_size=chunk,
                             method=method),
        lambda: batched_rows(doubles_its_input, x.reshape(3, 1).repeat(1, 2), 0, 6,
                             chunk_size=chunk, method=method),
        lambda: list(iter_rows(Problem(doubles_its_input, x), 0, 3, chunk_size=chunk,
                               method=method)),
    ]
    for call in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VmapFallbackWarning)
            with pytest.raises(InputWriteError, match="fn writes into its input x.*t = t.clone"):
                call()
        assert torch.equal(x, before)
    assert issubclass(InputWriteError, JacpipeError)  # the worker reports it in one line


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_writes_into_a_fresh_tensor_are_fine(dtype, method):
    def f(t):
        out = t.clone()
        out.mul_(2)
        return out**2

    x = point(dtype)
    close(jacobian_rows(f, x, 0, 6, chunk_size=1, method=method), jacobian(f, x))


def sample_sized(v):
    return v.repeat(int(v[0].item()))  # sample 0: 1 copy, sample 1: 2 copies


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_a_sample_of_another_size_is_one_clear_error(dtype, method, chunk):
    xs = torch.tensor([[1.0, 5.0], [2.0, 3.0], [1.0, 1.0]], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VmapFallbackWarning)
        with pytest.raises(SampleShapeError, match=r"fn\(xs\[1\]\) has 4 entries but "
                                                   r"fn\(xs\[0\]\) has 2"):
            batched_rows(sample_sized, xs, 0, 6, chunk_size=chunk, method=method)
        # the same samples, each its own size: sample 2 is fine, sample 1 is not
        close(batched_rows(sample_sized, xs, 4, 6, method=method),
              jacobian(sample_sized, xs[2]))
        with pytest.raises(SampleShapeError, match=r"xs\[1\]"):
            batched_rows(sample_sized, xs, 2, 3, method=method)
    assert issubclass(SampleShapeError, JacpipeError) and issubclass(SampleShapeError, ValueError)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fn", [old_style_chain, with_item_chain])
def test_hessians_torch_func_cannot_transform_fall_back(dtype, method, fn):
    x = point(dtype, 7)
    ref = hessian(fn, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.cat([hessian_rows(fn, x, a, b, chunk_size=2, method=method)
                         for a, b in [(0, 3), (3, 7)]])
    close(got, ref)
    falls = [w for w in caught if issubclass(w.category, VmapFallbackWarning)]
    assert len(falls) == (2 if fn is old_style_chain else 0)  # one per call (shard)


def test_hessian_fallback_of_a_function_linear_in_x_is_zero():
    x = point(torch.float64, 4)
    with pytest.warns(VmapFallbackWarning):
        got = hessian_rows(lambda t: OldStyle.apply(t * 0 + 1).sum() + t.sum(), x, 0, 4)
    close(got, torch.zeros(4, 4, dtype=torch.float64))


class _Identity(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(v):
        return v.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return DoubledUnderVmap.apply(g)


def _doubled_under_vmap(t: torch.Tensor) -> torch.Tensor:
    """Its Jacobian is diag(1); vectorised reverse mode gives diag(2) (the wrong rule)."""
    return _Identity.apply(t)


@pytest.mark.parametrize("n", [6, 300])  # every row combined; 32 rows picked of a big chunk
def test_the_spot_check_refuses_a_wrong_batching_rule_in_small_and_big_chunks(n):
    from pipeline.maths.checks import VmapMismatchWarning

    x = torch.linspace(-1, 1, n, dtype=torch.float64)
    assert (n * n <= engine.SPOT_WHOLE_NUMEL) == (n == 6)
    torch.testing.assert_close(torch.func.jacrev(_doubled_under_vmap)(x), 2 * torch.eye(n,
                               dtype=torch.float64))  # the bug
    with pytest.warns(VmapMismatchWarning, match="without vmap"):
        got = jacobian_rows(_doubled_under_vmap, x, 0, n)
    torch.testing.assert_close(got, torch.eye(n, dtype=torch.float64))


def test_a_wrong_batching_rule_is_refused_on_every_call_with_the_kept_identity():
    from pipeline.maths.checks import VmapMismatchWarning

    x = torch.linspace(-1, 1, 6, dtype=torch.float64)
    for _ in range(3):  # the second and third calls reuse the identity the first kept
        with pytest.warns(VmapMismatchWarning, match="without vmap"):
            got = jacobian_rows(_doubled_under_vmap, x, 0, 6)
        torch.testing.assert_close(got, torch.eye(6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_backward_that_writes_into_its_cotangents_gets_fresh_ones_on_the_next_call(dtype):
    x = point(dtype, 5)
    fn = lambda t: ClearsItsGrad.apply(t.sin())  # noqa: E731  (its backward meets our cotangents)
    ref = jacobian(fn, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the spot check's own cotangent is rebuilt too
        for _ in range(3):
            close(jacobian_rows(fn, x, 0, 5), ref)


def test_rows_that_are_the_identity_itself_are_never_shared_between_calls():
    x = point(torch.float64, 4)
    first = jacobian_rows(lambda t: t, x, 0, 4)
    second = jacobian_rows(lambda t: t, x, 0, 4)
    first.mul_(2)  # the caller owns its rows
    torch.testing.assert_close(second, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(jacobian_rows(lambda t: t, x, 0, 4),
                               torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reverse_rows_equal_jacrev_and_autograd_under_forward_mode_and_on_subclasses(dtype):
    import torch.autograd.forward_ad as fwAD

    problem = build_problem("mlp", {**JOBS["mlp"], "dtype": str(dtype).removeprefix("torch.")})
    ref = torch.func.jacrev(problem.fn)(problem.x)
    close(jacobian_rows(problem.fn, problem.x, 0, 30), ref)  # the engine's own entry point
    with fwAD.dual_level():  # a forward-mode level is active: torch.autograd.grad
        close(jacobian_rows(problem.fn, problem.x, 0, 30), ref)

    class Marked(torch.Tensor):  # an output with __torch_function__: torch.autograd.grad
        pass

    close(jacobian_rows(lambda t: problem.fn(t).as_subclass(Marked), problem.x, 0, 30)
          .as_subclass(torch.Tensor), flat_reference(problem.fn, problem.x))


@pytest.mark.parametrize("method", METHODS)
def test_rows_inside_inference_mode_equal_autograd(method):
    x = point(torch.float64, 5)
    ref = flat_reference(lambda t: torch.sin(t) * t.sum(), x)
    with torch.inference_mode():
        inferred = x.clone()  # an inference tensor
        for point_ in (x, inferred):
            got = jacobian_rows(lambda t: torch.sin(t) * t.sum(), point_, 0, 5, method=method)
            close(got, ref)


engine_picked_rows = engine._picked_rows  # the real one, for the spy below


def test_a_wrong_batching_rule_is_refused_in_a_column_major_chunk(monkeypatch):
    from pipeline.maths.checks import VmapMismatchWarning

    w = torch.randn(200, 150, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = torch.linspace(-1, 1, 150, dtype=torch.float64)
    fn = lambda t: w @ _doubled_under_vmap(t)  # noqa: E731
    wrong = torch.func.jacrev(fn)(x)
    assert wrong.stride(0) == 1  # w @ x layers give column-major rows
    torch.testing.assert_close(wrong, 2 * w)  # the bug
    gathered = []
    import pipeline.maths.peel

    # the identity's rows, column-major as jacrev's (peeled, the rows would be row-major)
    monkeypatch.setattr(pipeline.maths.peel, "peel", lambda y, xg: None)
    monkeypatch.setattr(engine, "_picked_rows", lambda rows, index: gathered.append(
        rows.stride()) or engine_picked_rows(rows, index))
    with pytest.warns(VmapMismatchWarning, match="without vmap"):
        got = jacobian_rows(fn, x, 0, 200)  # 32 of 200 rows picked, gathered by column
    assert gathered and gathered[0][0] == 1
    torch.testing.assert_close(got, w)


@pytest.mark.parametrize("column_major", [False, True])
def test_picked_rows_are_the_rows_at_the_index(column_major):
    rows = torch.randn(40, 30, dtype=torch.float64)
    rows = rows.T.contiguous().T if column_major else rows
    index = torch.tensor([0, 3, 17, 39])
    torch.testing.assert_close(engine._picked_rows(rows, index), rows[index], rtol=0, atol=0)
