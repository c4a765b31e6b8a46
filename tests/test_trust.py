"""Trust: every mode gives autograd's answer or says why (issue #13).

Seven classes of functions that broke jacpipe against
``torch.autograd.functional.jacobian`` / ``hessian``, each in float32 and
float64 through the engine's entry points: writes into the input, what only
reverse mode honours (the adjoint check), per-sample sizes, the fingerprint,
Hessians torch.func cannot transform, dtypes, and NaN reporting in compare.
"""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.autograd.functional import hessian, jacobian

from pipeline import Problem
from pipeline.analysis.compare import disagreements, errors, explain_nan_differences
from pipeline.core.errors import JacpipeError
from pipeline.core.fingerprint import FingerprintMismatch, check_fingerprint
from pipeline.maths.adjoint import ADJOINT_RTOL, AdjointCheck, adjoint_check
from pipeline.maths.engine import (
    InputWriteError,
    SampleShapeError,
    VmapFallbackWarning,
    batched_rows,
    hessian_rows,
    jacobian_rows,
)
from pipeline.maths.kinds import iter_rows
from pipeline.problem.problem import (
    build_problem,
    code_sha256,
    fingerprint,
    source_sha256,
    validate,
)
from pipeline.sparse.coloring import choose_coloring
from pipeline.sparse.compressed import banded_pattern, sparse_hessian_rows
from tests.manifests import read_doc
from tests.userjobs import OldStyle

DTYPES = [torch.float32, torch.float64]
METHODS = ["rev", "fwd"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
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


def point(dtype, n=6):
    return torch.linspace(0.3, 1.7, n, dtype=dtype)


def close(got, ref):
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, **TOL[ref.dtype])


# ---------------------------------------------------------------------------
# 1. A function that writes into its input
# ---------------------------------------------------------------------------


def doubles_its_input(t):
    t.mul_(2)
    return t**2


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_writes_into_a_fresh_tensor_are_fine(dtype, method):
    def f(t):
        out = t.clone()
        out.mul_(2)
        return out**2

    x = point(dtype)
    close(jacobian_rows(f, x, 0, 6, chunk_size=1, method=method), jacobian(f, x))


# ---------------------------------------------------------------------------
# 2. What only reverse mode honours: the adjoint check
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# 3. Per-sample outputs whose size depends on the sample
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# 4. A fingerprint that sees derivatives and code
# ---------------------------------------------------------------------------


def scaled_backward(c):
    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(v):
            return torch.sin(v)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (v,) = ctx.saved_tensors
            return c * g * torch.cos(v)

    return Scaled.apply


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["jacobian", "hessian", "batched"])
def test_a_backward_only_change_changes_the_fingerprint(dtype, kind):
    x = point(dtype).reshape(3, 2) if kind == "batched" else point(dtype)

    def make(c):
        f = scaled_backward(c)
        fn = (lambda t: (f(t) ** 2).sum()) if kind == "hessian" else f
        p = Problem(fn, x, kind=kind)
        return fingerprint(p, validate(p))

    a, b = make(1.0), make(1.5)
    assert a["y_probe"] == b["y_probe"]  # fn(x) is the same: only the derivative differs
    check_fingerprint(a, make(1.0))
    with pytest.raises(FingerprintMismatch, match="derivative of fn differs") as info:
        check_fingerprint(a, b)
    assert info.value.field == "derivative"


@pytest.mark.parametrize("dtype", DTYPES)
def test_unseeded_weights_where_fn_does_not_depend_on_them_are_caught(dtype):
    x = torch.zeros(4, dtype=dtype)

    def make(seed):
        w = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        p = Problem(lambda t: torch.tanh(w @ t), x)
        return fingerprint(p, validate(p))

    a, b = make(1), make(2)
    assert a["y_probe"] == b["y_probe"] == [0.0, 0.0, 0.0]
    with pytest.raises(FingerprintMismatch) as info:
        check_fingerprint(a, b)
    assert info.value.field == "derivative"


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_fn_x_matches_itself_and_is_json(dtype):
    x = torch.tensor([-1.0, 0.0, 4.0, float("inf")], dtype=dtype)
    p = Problem(lambda t: torch.sqrt(t) * 2, x)  # NaN, 0 (inf derivative), finite, inf
    fp = fingerprint(p, validate(p))
    text = json.dumps(fp, allow_nan=False)
    check_fingerprint(json.loads(text), fingerprint(p, validate(p)))
    assert fp["y_nonfinite"] == 2 and "nan" in fp["y_probe"]
    q = Problem(lambda t: torch.sqrt(t) * 3, x)
    with pytest.raises(FingerprintMismatch) as info:
        check_fingerprint(fp, fingerprint(q, validate(q)))
    assert info.value.field == "y"


def test_fingerprint_fields_and_the_error_survive_pickling():
    a = build_problem("mlp", {"n": 6, "m": 4, "hidden": 5})
    fp = fingerprint(a, validate(a), spec="mlp")
    assert fp["source_sha256"] == source_sha256("mlp") is not None
    assert fp["code_sha256"] == code_sha256(a.fn) is not None
    assert source_sha256("tests.userjobs:matrix_io") != source_sha256("mlp")
    check_fingerprint(fp, fingerprint(build_problem("mlp", {"n": 6, "m": 4, "hidden": 5}),
                                      validate(a), spec="mlp"))
    edited = dict(fp, source_sha256="0" * 64)
    with pytest.raises(FingerprintMismatch) as info:
        check_fingerprint(edited, fp)
    assert info.value.field == "source"
    assert code_sha256(lambda t: t * 2) != code_sha256(lambda t: t * 3)
    check_fingerprint(fp, dict(fp, source_sha256=None))  # one side without spec: not compared
    old = {k: v for k, v in fp.items() if k != "derivative"}  # written by an older jacpipe
    with pytest.raises(FingerprintMismatch, match="no derivative probe") as info:
        check_fingerprint(old, fp)
    again = pickle.loads(pickle.dumps(info.value))
    assert again.field == "derivative" and str(again) == str(info.value)
    for field, change in [("shapes", {"shapes": {}}), ("x", {"x_sha256": "0"}),
                          ("y", {"y_norm": fp["y_norm"] * 1.5})]:
        with pytest.raises(FingerprintMismatch) as info:
            check_fingerprint(dict(fp, **change), fp)
        assert info.value.field == field


def test_fingerprint_never_writes_into_the_problems_x():
    x = point(torch.float64)
    before = x.clone()
    p = Problem(lambda t: t.mul_(2), x)
    fingerprint(p, validate(Problem(torch.sin, x)))
    assert torch.equal(x, before)


# ---------------------------------------------------------------------------
# 5. Hessians of functions torch.func cannot transform
# ---------------------------------------------------------------------------


def old_style_chain(v):
    return OldStyle.apply(v).sum() + (v[:-1] * v[1:].sin()).sum()


def with_item_chain(v):
    return (v**3).sum() * v.sum().item() + (v[:-1] * v[1:].sin()).sum()


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


@pytest.mark.parametrize("dtype", DTYPES)
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


def test_hessian_fallback_of_a_function_linear_in_x_is_zero():
    x = point(torch.float64, 4)
    with pytest.warns(VmapFallbackWarning):
        got = hessian_rows(lambda t: OldStyle.apply(t * 0 + 1).sum() + t.sum(), x, 0, 4)
    close(got, torch.zeros(4, 4, dtype=torch.float64))


# ---------------------------------------------------------------------------
# 6. Rows in x's dtype in every mode
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# 7. compare: NaN from 0 * NaN, and where the modes disagree
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_positions_that_differ_by_zero_times_nan_are_explained(dtype):
    x = torch.tensor([0.0, 1.0, 4.0], dtype=dtype)
    ref = jacobian(torch.sqrt, x).numpy()  # reverse mode: 0 / 0 = NaN off the diagonal
    got = jacobian_rows(torch.sqrt, x, 0, 3, method="fwd").numpy()  # forward mode: 0 there
    assert (np.isnan(ref) != np.isnan(got)).any()
    assert errors(got, ref, rtol=1e-5, atol=1e-5)[2] == np.inf  # a MISMATCH before
    fixed, note = explain_nan_differences(got, ref)
    assert "NaN on one side and 0 on the other" in note
    assert errors(fixed, ref, rtol=1e-5, atol=1e-5)[2] <= 1.0
    real = got.copy()
    real[0, 1] = np.nan  # NaN where the reference is finite and not 0: stays a mismatch
    real[1, 0] = 1.0
    same, note = explain_nan_differences(real, ref)
    assert note == "" and np.array_equal(np.isnan(same), np.isnan(real))


def test_disagreements_name_the_worst_entries():
    ref = np.zeros((3, 4))
    got = ref.copy()
    got[1, 2], got[2, 3] = 5.0, np.nan
    text = disagreements(got, ref, rows=np.array([10, 11, 12]), rtol=1e-5, atol=1e-5)
    assert text.startswith("2 entries") and "J[12, 3] = nan vs 0" in text
    assert "J[11, 2] = 5 vs 0" in text


# ---------------------------------------------------------------------------
# End to end through the CLI with Ray: the driver's wiring (issue 13)
# ---------------------------------------------------------------------------


def _cli(*args: object):
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_auto_keeps_reverse_mode_when_forward_mode_disagrees(ray_session, tmp_path, dtype):
    out = tmp_path / "out"
    result = _cli("run", "tests.userjobs:tall_no_grad", "-p", f"dtype={dtype}", "--out", out,
                  "--no-progress", "--verify")
    assert result.exit_code == 0, result.output
    assert "note: reverse mode, not forward: forward and reverse mode give different" in \
        result.output
    man = read_doc(out)
    assert man["method"] == "rev" and man["adjoint_check"]["agree"] is False
    assert "MATCH" in result.output and "MISMATCH" not in result.output
    forced = _cli("run", "tests.userjobs:tall_no_grad", "-p", f"dtype={dtype}", "--method",
                  "fwd", "--out", tmp_path / "fwd", "--no-progress")
    assert forced.exit_code == 0, forced.output
    assert "warning: --method fwd although forward and reverse mode give" in forced.output
    assert read_doc(tmp_path / "fwd")["method"] == "fwd"


def test_auto_takes_forward_mode_when_the_modes_agree(ray_session, tmp_path):
    out = tmp_path / "out"
    result = _cli("run", "tests.userjobs:tall", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    man = read_doc(out)
    assert man["method"] == "fwd" and man["adjoint_check"]["agree"] is True


def test_a_resume_after_a_backward_only_change_is_refused(ray_session, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ("run", "tests.userjobs:custom_backward", "--shards", 3, "--out", out, "--no-progress")
    first = _cli(*args)
    assert first.exit_code == 0, first.output
    # The backward now scales by another constant (as after an edit of only the
    # custom backward): fn(x), x and the shapes are unchanged.
    monkeypatch.setenv("JACPIPE_TEST_BACKWARD_SCALE", "2.0")
    again = _cli(*args)
    assert again.exit_code == 2, again.output
    assert "the job changed since these shards were written (differs in: fingerprint: " \
           "derivative); --overwrite to start again" in again.output


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_trust_classes_end_to_end_through_the_cli(ray_session, tmp_path, dtype):
    d = ["-p", f"dtype={dtype}", "--no-progress"]
    # 1. fn writes into its input: refused with the right reason, not "nondeterministic"
    writes = _cli("run", "tests.userjobs:writes_input", *d, "--out", tmp_path / "w")
    assert writes.exit_code == 2, writes.output
    assert "writes into its input" in writes.output and "nondeterministic" not in writes.output
    # 3. a per-sample output of another size: one line naming the sample
    ragged = _cli("run", "tests.userjobs:ragged_samples", *d, "--out", tmp_path / "r")
    assert ragged.exit_code != 0 and "Traceback" not in ragged.output
    assert "fn(xs[" in ragged.output and "entries" in ragged.output
    # 5. NaN in fn(x): a run like any other, and compare matches NaN with NaN
    nan = _cli("run", "tests.userjobs:nan_at_x", *d, "--out", tmp_path / "n", "--verify")
    assert nan.exit_code == 0 and "MATCH" in nan.output, nan.output
    assert "nondeterministic" not in nan.output
    # 6. a Hessian of a function torch.func cannot transform: autograd's answer
    hess = _cli("run", "tests.userjobs:old_style_hessian", *d, "--out", tmp_path / "h",
                "--verify")
    assert hess.exit_code == 0 and "MATCH" in hess.output, hess.output
    # 7. rows come back in x's dtype
    man = read_doc(tmp_path / "h")
    assert man["dtype"] == dtype
    from pipeline import read_jacobian

    assert str(read_jacobian(tmp_path / "h").dtype) == dtype
