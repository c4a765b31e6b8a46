"""``pipeline.sparse.compressed``: compressed Jacobians and Hessians, and sparse runs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian, jacobian
from typer.testing import CliRunner

from jobs import banded, brusselator
from pipeline import read_jacobian
from pipeline.cli import app
from pipeline.maths import checks
from pipeline.maths.compiled import CompileFallbackWarning
from pipeline.maths.engine import InputWriteError, VmapFallbackWarning
from pipeline.problem.problem import Problem, build_problem
from pipeline.sparse.coloring import (
    Coloring,
    choose_coloring,
    column_coloring,
    row_coloring,
    validate_coloring,
)
from pipeline.sparse.compressed import (
    SparseRows,
    banded_pattern,
    evaluate_rows,
    sparse_hessian_rows,
    sparse_jacobian_rows,
    stencil_pattern,
)
from tests.manifests import read_doc
from tests.maths.trust import DTYPES as TORCH_DTYPES
from tests.maths.trust import close, doubles_its_input, old_style_chain, point, with_item_chain

DTYPES = {"float32": (torch.float32, 1e-5), "float64": (torch.float64, 1e-12)}


def _dense_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    def flat(t):
        return fn(t.reshape(x.shape)).reshape(-1)

    return torch.func.jacrev(flat)(x.detach().reshape(-1))


def _assert_rows_equal(rows: SparseRows, expected: torch.Tensor, rtol: float) -> None:
    got = rows.to_dense(expected.shape[1])
    assert got.dtype == expected.dtype
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale)


def _ranges(m: int) -> list[tuple[int, int]]:
    """Whole, empty (at both ends and inside), single-row and uneven ranges."""
    return [(0, m), (0, 0), (m, m), (m // 2, m // 2), (0, 1), (m - 1, m), (3, m // 3 + 5)]


def _forward(pattern) -> Coloring:
    colors = column_coloring(pattern)
    return Coloring(colors, int(colors.max()) + 1, "fwd")


def _reverse(pattern) -> Coloring:
    colors = row_coloring(pattern)
    return Coloring(colors, int(colors.max()) + 1, "rev")


def _laplacian_residual(N: int):
    """A stencil-based function: u^3 + sin(u) - Lap(u), zero Dirichlet, on (N, N)."""

    def fn(u: torch.Tensor) -> torch.Tensor:
        p = F.pad(u.unsqueeze(0), (1, 1, 1, 1)).squeeze(0)
        lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u
        return u**3 + torch.sin(u) - lap

    return fn


def _rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_coloring", [_forward, _reverse], ids=["fwd", "rev"])
@pytest.mark.parametrize(
    "problem",
    [
        lambda dtype: brusselator.build(N=6, dtype=dtype),
        lambda dtype: banded.build(n=40, k=3, dtype=dtype),
    ],
    ids=["brusselator", "banded"],
)
def test_jobs_match_the_dense_jacobian(problem, make_coloring, dtype):
    prob = problem(dtype)
    torch_dtype, rtol = DTYPES[dtype]
    assert prob.x.dtype == torch_dtype
    coloring = make_coloring(prob.sparsity)
    validate_coloring(prob.sparsity, coloring)
    dense = _dense_jacobian(prob.fn, prob.x)
    m = dense.shape[0]
    for start, stop in _ranges(m):
        rows = sparse_jacobian_rows(
            prob.fn, prob.x, start, stop, prob.sparsity, coloring, chunk_size=3
        )
        assert rows.rows.tolist() == list(range(start, stop))
        assert rows.indptr.shape == (stop - start + 1,)
        assert rows.values.shape == rows.cols.shape
        _assert_rows_equal(rows, dense[start:stop], rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stencil_function_with_a_2d_input(dtype):
    torch_dtype, rtol = DTYPES[dtype]
    N = 9
    x = torch.randn(N, N, generator=torch.Generator().manual_seed(1), dtype=torch_dtype)
    fn = _laplacian_residual(N)
    pattern = stencil_pattern(N, 5)
    coloring = choose_coloring(pattern)
    assert coloring.num_colors == 5
    dense = _dense_jacobian(fn, x)
    # Shards in order, uneven, reproduce the whole matrix.
    bounds = [0, 7, 8, 8, 40, N * N]
    parts = [
        sparse_jacobian_rows(fn, x, a, b, pattern, coloring).to_dense(N * N)
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    torch.testing.assert_close(
        torch.cat(parts), dense, rtol=rtol, atol=rtol * dense.abs().max().item()
    )


def test_brusselator_pattern_is_exact():
    N = 5
    prob = brusselator.build(N=N)
    # A generic point so that no entry of the pattern vanishes by accident.
    x = torch.rand(2 * N * N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dense = _dense_jacobian(prob.fn, x + 0.5)
    assert np.array_equal(dense.numpy() != 0, prob.sparsity.toarray())
    assert prob.sparsity.shape == (2 * N * N, 2 * N * N)
    assert prob.sparsity.nnz == 2 * N * N * 6


def test_banded_job_has_2k_plus_1_bands():
    prob = banded.build(n=30, k=3)
    dense = _dense_jacobian(prob.fn, prob.x)
    assert np.array_equal(dense.numpy() != 0, prob.sparsity.toarray())
    assert np.array_equal(prob.sparsity.toarray(), banded_pattern(30, 7).toarray())
    assert choose_coloring(prob.sparsity).num_colors == 7


def test_shards_evaluate_only_the_colours_they_touch(monkeypatch):
    passes = []
    vmap = torch.func.vmap

    def spy(f, *args, **kwargs):
        mapped = vmap(f, *args, **kwargs)

        def run(seeds):
            passes.append(seeds.shape[0])
            return mapped(seeds)

        return run

    monkeypatch.setattr(torch.func, "vmap", spy)
    prob = banded.build(n=60, k=3)  # 7 bands: 7 colours either way
    dense = _dense_jacobian(prob.fn, prob.x)
    for coloring, (start, stop), expected in [
        (_forward(prob.sparsity), (0, 1), 4),  # row 0 holds columns 0..3
        (_forward(prob.sparsity), (10, 30), 7),
        (_reverse(prob.sparsity), (10, 12), 2),  # two rows, two row colours
        (_reverse(prob.sparsity), (0, 0), None),  # nothing to evaluate
    ]:
        assert coloring.num_colors == 7
        passes.clear()
        rows = sparse_jacobian_rows(prob.fn, prob.x, start, stop, prob.sparsity, coloring)
        assert passes == ([] if expected is None else [expected])
        _assert_rows_equal(rows, dense[start:stop], 1e-12)


def test_reverse_mode_on_a_dense_row():
    n = 25

    def fn(x):
        return torch.cat([(x**2).sum().reshape(1), torch.sin(x[1:]) * x[1:]])

    pattern = sp.lil_matrix((n, n), dtype=bool)
    pattern[0, :] = True
    pattern.setdiag(True)
    coloring = choose_coloring(pattern.tocsr())
    assert coloring.mode == "rev"
    x = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dense = _dense_jacobian(fn, x)
    for start, stop in _ranges(n):
        rows = sparse_jacobian_rows(fn, x, start, stop, pattern, coloring, chunk_size=1)
        _assert_rows_equal(rows, dense[start:stop], 1e-12)


def test_jacobian_errors_are_clear():
    prob = banded.build(n=20, k=1)
    coloring = _forward(prob.sparsity)
    with pytest.raises(ValueError, match=r"row range \[5, 30\)"):
        sparse_jacobian_rows(prob.fn, prob.x, 5, 30, prob.sparsity, coloring)
    with pytest.raises(ValueError, match="x has 20 entries"):
        sparse_jacobian_rows(prob.fn, prob.x, 0, 5, banded_pattern(21, 3), coloring)
    with pytest.raises(ValueError, match="not usable here"):
        symmetric = Coloring(coloring.colors, coloring.num_colors, "symmetric")
        sparse_jacobian_rows(prob.fn, prob.x, 0, 5, prob.sparsity, symmetric)
    wide = sp.csr_matrix(np.eye(21, 20, dtype=bool))
    with pytest.raises(ValueError, match="fn.x. has 20 entries but the pattern has 21 rows"):
        sparse_jacobian_rows(prob.fn, prob.x, 0, 5, wide, _forward(wide))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rosenbrock_hessian_with_three_colours(dtype):
    torch_dtype, rtol = DTYPES[dtype]
    n = 50
    x = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch_dtype)
    pattern = banded_pattern(n, 3)
    coloring = choose_coloring(pattern, symmetric=True)
    assert coloring.num_colors == 3
    assert choose_coloring(banded_pattern(20_000, 3), symmetric=True).num_colors == 3
    dense = torch.autograd.functional.hessian(_rosenbrock, x)
    for start, stop in _ranges(n):
        rows = sparse_hessian_rows(_rosenbrock, x, start, stop, pattern, coloring, chunk_size=2)
        _assert_rows_equal(rows, dense[start:stop], rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_star_decompression_reads_transposed_entries(dtype):
    # An arrowhead Hessian: star colouring needs 2 colours where a column
    # colouring needs n, so row 0 is read entirely from the other rows.
    torch_dtype, rtol = DTYPES[dtype]
    n = 20

    def fn(x):
        return x[0] * (x[1:] ** 2).sum() + (x**3).sum()

    pattern = sp.lil_matrix((n, n), dtype=bool)
    pattern[0, :] = True
    pattern.setdiag(True)  # one triangle only: symmetrised inside
    coloring = choose_coloring(pattern.tocsr(), symmetric=True)
    assert coloring.num_colors == 2
    x = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch_dtype)
    dense = torch.autograd.functional.hessian(fn, x)
    for start, stop in _ranges(n):
        rows = sparse_hessian_rows(fn, x, start, stop, pattern.tocsr(), coloring)
        _assert_rows_equal(rows, dense[start:stop], rtol)


def test_hessian_on_a_grid_with_a_column_colouring():
    N = 7

    def energy(u):
        return ((u[1:] - u[:-1]) ** 4).sum() + ((u[:, 1:] - u[:, :-1]) ** 4).sum() + u.pow(3).sum()

    x = torch.randn(N, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pattern = stencil_pattern(N, 5)
    dense = torch.autograd.functional.hessian(energy, x).reshape(N * N, N * N)
    for coloring in (_forward(pattern), choose_coloring(pattern, symmetric=True)):
        rows = sparse_hessian_rows(energy, x, 4, 30, pattern, coloring)
        _assert_rows_equal(rows, dense[4:30], 1e-12)


def test_hessian_errors_are_clear():
    x = torch.randn(6, dtype=torch.float64)
    coloring = choose_coloring(banded_pattern(6, 3), symmetric=True)
    with pytest.raises(ValueError, match="must be square"):
        sparse_hessian_rows(_rosenbrock, x, 0, 6, sp.csr_matrix((6, 5)), coloring)
    with pytest.raises(ValueError, match="scalar fn"):
        sparse_hessian_rows(torch.sin, x, 0, 6, banded_pattern(6, 3), coloring)


def test_stencil_patterns_match_their_stencils():
    N = 6
    x = torch.randn(N, N, dtype=torch.float64)
    dense = _dense_jacobian(_laplacian_residual(N), x)
    assert np.array_equal(dense.numpy() != 0, stencil_pattern(N, 5).toarray())

    def box(u):  # 3 x 3 box sum with zero padding: the 9-point pattern
        return F.conv2d(u[None, None], torch.ones(1, 1, 3, 3, dtype=u.dtype), padding=1)[0, 0]

    assert np.array_equal(_dense_jacobian(box, x).numpy() != 0, stencil_pattern(N, 9).toarray())
    periodic = stencil_pattern(N, 5, periodic=True)
    assert periodic.nnz == 5 * N * N
    assert np.array_equal(periodic.toarray(), periodic.T.toarray())
    assert stencil_pattern(N, 9, periodic=True).nnz == 9 * N * N
    assert stencil_pattern(N, 5).dtype == bool


def test_pattern_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match="points must be 5 or 9"):
        stencil_pattern(4, 7)
    with pytest.raises(ValueError, match="N must be at least 1"):
        stencil_pattern(0)
    with pytest.raises(ValueError, match="positive odd"):
        banded_pattern(10, 4)
    assert banded_pattern(10, 5).nnz == 10 * 5 - 2 * (1 + 2)


def test_evaluate_rows_dispatches_on_the_kind():
    prob = brusselator.build(N=4)
    coloring = choose_coloring(prob.sparsity)
    as_json = {
        "colors": coloring.colors.tolist(),
        "num_colors": coloring.num_colors,
        "mode": coloring.mode,
    }
    dense = _dense_jacobian(prob.fn, prob.x)
    _assert_rows_equal(evaluate_rows(prob, 3, 20, as_json, chunk_size=4), dense[3:20], 1e-12)

    x = torch.randn(12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    hess = Problem(fn=_rosenbrock, x=x, kind="hessian", sparsity=banded_pattern(12, 3))
    coloring = choose_coloring(hess.sparsity, symmetric=True)
    expected = torch.autograd.functional.hessian(_rosenbrock, x)
    _assert_rows_equal(evaluate_rows(hess, 2, 9, coloring), expected[2:9], 1e-12)

    with pytest.raises(ValueError, match="needs Problem.sparsity"):
        evaluate_rows(Problem(fn=prob.fn, x=prob.x), 0, 1, coloring)
    with pytest.raises(ValueError, match="got 'batched'"):
        evaluate_rows(
            Problem(fn=torch.sin, x=x[None], kind="batched", sparsity=hess.sparsity), 0, 1, coloring
        )


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_sparse_hessian_refuses_writes_into_the_input(dtype):
    x = point(dtype, 5)
    before = x.clone()
    pattern = banded_pattern(5, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VmapFallbackWarning)
        with pytest.raises(InputWriteError):
            sparse_hessian_rows(lambda t: doubles_its_input(t).sum(), x, 0, 5, pattern,
                                choose_coloring(pattern, symmetric=True))
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("fn", [old_style_chain, with_item_chain])
def test_sparse_hessians_torch_func_cannot_transform_fall_back(dtype, fn):
    x = point(dtype, 7)
    ref = hessian(fn, x)
    pattern = banded_pattern(7, 3)
    coloring = choose_coloring(pattern, symmetric=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sparse_hessian_rows(fn, x, 0, 7, pattern, coloring, chunk_size=2)
    close(got.to_dense(7), ref)
    falls = [w for w in caught if issubclass(w.category, VmapFallbackWarning)]
    assert len(falls) <= 1


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def dense_reference(job, params):
    problem = build_problem(job, params)
    return jacobian(problem.fn, problem.x).reshape(-1, problem.x.numel()).numpy()


@pytest.mark.parametrize("job,params,colors", [
    ("heat", {"N": 12}, 5),
    ("banded", {"n": 300, "k": 2}, 5),
    ("brusselator", {"N": 8}, None),
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sparse_jobs_equal_the_dense_jacobian(ray_session, tmp_path, job, params, colors, dtype):
    out = tmp_path / job
    args = [f"{k}={v}" for k, v in params.items()]
    result = invoke("run", job, *sum((["-p", a] for a in args), []), "--dtype", dtype,
                    "--shards", 3, "--out", out, "--verify")
    assert result.exit_code == 0, result.output
    man = read_doc(out)
    assert man["layout"] == "sparse" and man["method"] == "sparse"
    if colors is not None:
        assert man["coloring"]["num_colors"] == colors
    got = read_jacobian(out)
    assert sp.issparse(got)
    ref = dense_reference(job, {**params, "dtype": dtype})
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got.toarray(), ref, **tol)
    assert got.nnz == man["coloring"]["nnz"]
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.field("cols").type == pa.list_(pa.int64())
    info = json.loads(invoke("inspect", out, "--json").output)
    assert info["layout"] == "sparse" and info["colours"] == man["coloring"]["num_colors"]
    assert info["density"] == pytest.approx(man["coloring"]["nnz"] / ref.size)


def test_a_too_sparse_pattern_is_caught_by_compare(ray_session, tmp_path):
    # banded with k=2 has 5 bands; claim only 3.
    pattern = tmp_path / "tri.npz"
    sp.save_npz(pattern, banded_pattern(200, 3).astype(np.float64))
    out = tmp_path / "b"
    result = invoke("run", "banded", "-p", "n=200", "--sparsity", pattern, "--out", out)
    assert result.exit_code == 0, result.output
    cmp = invoke("compare", out, "--rows", 20)
    assert cmp.exit_code == 1
    assert "too sparse" in cmp.output and "outside" in cmp.output
    report = json.loads(invoke("compare", out, "--rows", 20, "--json").output)
    assert not report["ok"] and any("J[" in p for p in report["problems"])


def test_parquet_pattern_file_and_dense_override(ray_session, tmp_path):
    pat = banded_pattern(150, 5).tocoo()
    table = pa.table({"row": pat.row.astype(np.int64), "col": pat.col.astype(np.int64)})
    table = table.replace_schema_metadata({"shape": "150,150"})
    pq.write_table(table, tmp_path / "p.parquet")
    out = tmp_path / "o"
    result = invoke("run", "banded", "-p", "n=150", "--sparsity", tmp_path / "p.parquet",
                    "--out", out, "--verify")
    assert result.exit_code == 0, result.output
    dense = tmp_path / "d"
    result = invoke("run", "banded", "-p", "n=150", "--method", "rev", "--out", dense)
    assert result.exit_code == 0
    assert read_doc(dense)["layout"] == "dense"
    np.testing.assert_allclose(read_jacobian(out).toarray(), read_jacobian(dense), rtol=1e-12)


def _arwhead(x: torch.Tensor) -> torch.Tensor:
    """CUTEst ARWHEAD: the last variable is next to every other in the Hessian."""
    return (-4 * x[:-1] + 3).sum() + ((x[:-1] ** 2 + x[-1] ** 2) ** 2).sum()


def _arwhead_pattern(n: int) -> sp.csr_matrix:
    i = np.arange(n)
    r, c = np.concatenate([i, np.full(n, n - 1)]), np.concatenate([i, i])
    return sp.csr_matrix((np.ones(2 * n, dtype=bool), (r, c)), shape=(n, n))


@pytest.mark.parametrize("dtype", DTYPES)
def test_arwhead_hessian_small_equals_torch(dtype):
    torch_dtype, rtol = DTYPES[dtype]
    n = 30
    x = torch.randn(n, generator=torch.Generator().manual_seed(8), dtype=torch_dtype)
    coloring = choose_coloring(_arwhead_pattern(n), symmetric=True)
    assert coloring.num_colors == 2
    dense = torch.autograd.functional.hessian(_arwhead, x)
    for start, stop in _ranges(n):
        for chunk in (None, 1):
            rows = sparse_hessian_rows(_arwhead, x, start, stop, _arwhead_pattern(n), coloring,
                                       chunk_size=chunk)
            _assert_rows_equal(rows, dense[start:stop], rtol)


def test_arwhead_hessian_at_100000_takes_two_hvps():
    # Two colours, and seeds chunked to DEFAULT_CHUNK_BYTES: this once tried
    # to allocate 100,000 seed vectors (80 GB) at once.
    n = 100_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    pattern = _arwhead_pattern(n)
    coloring = choose_coloring(pattern, symmetric=True)
    assert coloring.num_colors == 2
    rows = (0, 1, n // 2, n - 2, n - 1)
    got = {r: sparse_hessian_rows(_arwhead, x, r, r + 1, pattern, coloring) for r in rows}
    for r in rows:
        basis = torch.zeros(n, dtype=x.dtype)
        basis[r] = 1
        expected = torch.autograd.functional.hvp(_arwhead, x, basis)[1]
        cols = np.flatnonzero(expected.numpy())
        assert got[r].cols.tolist() == (list(range(n)) if r == n - 1 else sorted({r, n - 1}))
        assert set(cols.tolist()) <= set(got[r].cols.tolist())
        torch.testing.assert_close(got[r].values, expected[got[r].cols], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_chunks_follow_the_byte_budget(monkeypatch, dtype):
    # A budget of one pass per chunk: the seeds go through in many chunks,
    # built lazily, and every mode still equals the dense references.
    import pipeline.sparse.compressed as compressed

    monkeypatch.setattr(compressed, "DEFAULT_CHUNK_BYTES", 1)
    torch_dtype, rtol = DTYPES[dtype]
    prob = brusselator.build(N=6, dtype=dtype)
    dense = _dense_jacobian(prob.fn, prob.x)
    for make in (_forward, _reverse):
        coloring = make(prob.sparsity)
        assert coloring.num_colors > 1
        for start, stop in _ranges(dense.shape[0]):
            rows = sparse_jacobian_rows(prob.fn, prob.x, start, stop, prob.sparsity, coloring)
            _assert_rows_equal(rows, dense[start:stop], rtol)
    x = torch.randn(40, generator=torch.Generator().manual_seed(3), dtype=torch_dtype)
    coloring = choose_coloring(banded_pattern(40, 3), symmetric=True)
    hess = torch.autograd.functional.hessian(_rosenbrock, x)
    for start, stop in _ranges(40):
        rows = sparse_hessian_rows(_rosenbrock, x, start, stop, banded_pattern(40, 3), coloring)
        _assert_rows_equal(rows, hess[start:stop], rtol)


@pytest.mark.slow
def test_compiled_passes_equal_the_eager_ones(tmp_path, monkeypatch):
    # torch.compile of the three passes (forward, reverse, Hessian) on small
    # problems: the same entries as eager to rounding. About 30 s of compiling.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    prob = brusselator.build(N=4)
    for make in (_forward, _reverse):
        coloring = make(prob.sparsity)
        eager = sparse_jacobian_rows(prob.fn, prob.x, 0, 32, prob.sparsity, coloring,
                                     compile="off")
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileFallbackWarning)
            got = sparse_jacobian_rows(prob.fn, prob.x, 0, 32, prob.sparsity, coloring,
                                       compile="on")
        torch.testing.assert_close(got.values, eager.values, rtol=1e-12, atol=1e-12)
    x = torch.randn(30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    coloring = choose_coloring(_arwhead_pattern(30), symmetric=True)
    eager = sparse_hessian_rows(_arwhead, x, 0, 30, _arwhead_pattern(30), coloring, compile="off")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        got = sparse_hessian_rows(_arwhead, x, 0, 30, _arwhead_pattern(30), coloring,
                                  compile="on")
    torch.testing.assert_close(got.values, eager.values, rtol=1e-12, atol=1e-12)
    _assert_rows_equal(got, torch.autograd.functional.hessian(_arwhead, x), 1e-12)
    # unchecked, the entries' pass runs alone (NOTE: [entries read inside the compiled
    # pass]); in chunks of colours, the plain pass
    for kwargs in ({}, {"chunk_size": 1}):
        with warnings.catch_warnings(), checks.checking(check_forward=False):
            warnings.simplefilter("error", CompileFallbackWarning)
            got = sparse_hessian_rows(_arwhead, x, 0, 30, _arwhead_pattern(30), coloring,
                                      compile="on", **kwargs)
        torch.testing.assert_close(got.values, eager.values, rtol=1e-12, atol=1e-12)


def test_compile_option_reaches_the_sparse_passes(tmp_path, monkeypatch):
    # --compile on, through the CLI and the in-process executor, to the worker's
    # passes (torch.compile stood in for by a counting wrapper: no compiler).
    from pipeline.maths import compiled

    built = []

    def compile_(fn):
        built.append(fn)
        return fn

    monkeypatch.setattr(compiled, "_compile", compile_)
    out = tmp_path / "b"
    for flag, count in (("off", 0), ("on", 1)):
        result = invoke("run", "brusselator", "-p", "N=5", "--executor", "local", "--shards", 2,
                        "--compile", flag, "--out", out / flag, "--no-progress")
        assert result.exit_code == 0, result.output
        assert len(built) == count
        np.testing.assert_allclose(read_jacobian(out / flag).toarray(),
                                   dense_reference("brusselator", {"N": 5}), rtol=1e-12,
                                   atol=1e-13)
    result = invoke("run", "brusselator", "--compile", "maybe", "--out", out / "x")
    assert result.exit_code != 0 and "--compile must be auto, on or off" in result.output


def test_repeated_calls_reuse_the_plan_and_follow_x(monkeypatch):
    # A Newton loop: the same pattern and colouring, x changing. The pattern
    # work is done once (NOTE: [compressed plans]); values follow x.
    import pipeline.sparse.compressed as compressed

    built = []
    real = compressed._jacobian_plan
    monkeypatch.setattr(compressed, "_jacobian_plan", lambda *a: built.append(a) or real(*a))
    prob = brusselator.build(N=5)
    coloring = _forward(prob.sparsity)
    for k in range(3):
        x = prob.x + 0.1 * k
        rows = sparse_jacobian_rows(prob.fn, x, 0, 50, prob.sparsity, coloring)
        _assert_rows_equal(rows, _dense_jacobian(prob.fn, x), 1e-12)
    assert len(built) == 1
    other = sp.csr_matrix(prob.sparsity)  # another object: its own plan
    sparse_jacobian_rows(prob.fn, prob.x, 0, 50, other, coloring)
    assert len(built) == 2
