"""``pipeline.problem.problem``: jobs, parameters, builders and fingerprints."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from pipeline import Problem
from pipeline.core.errors import JacpipeError
from pipeline.core.fingerprint import FingerprintMismatch, check_fingerprint
from pipeline.problem.problem import (
    build_problem,
    builtin_jobs,
    code_sha256,
    fingerprint,
    parse_params,
    resolve_builder,
    source_sha256,
    validate,
)
from tests.clitools import error_line
from tests.faultruns import CRASHY, copy_of_clean, invoke, manifest, run_crashy
from tests.manifests import write_doc
from tests.maths.trust import DTYPES, point


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


@pytest.mark.parametrize("code", [3, 0])
def test_a_build_that_calls_sys_exit_is_one_clear_error(code):
    with pytest.raises(JacpipeError, match=rf"build\(\) exited \(sys.exit\({code}\)\)") as caught:
        build_problem("tests.userjobs:exits_in_build", {"code": code})
    assert caught.value.exit_code == 2


def test_a_build_that_calls_sys_exit_is_one_line_from_the_cli(tmp_path):
    result = invoke("run", "tests.userjobs:exits_in_build", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "job 'tests.userjobs:exits_in_build': build() exited (sys.exit(3))" in error_line(result)


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


@pytest.mark.parametrize("spec,match", [
    ("../../etc/passwd:build", "dotted Python names"),
    (".hidden:build", "dotted Python names"),
    ("tests.userjobs:", "dotted Python names"),
    ("os.path:join extra", "dotted Python names"),
])
def test_job_specs_are_validated_before_any_import(spec, match):
    with pytest.raises(JacpipeError, match=match):
        resolve_builder(spec)


def test_job_changed_since_the_run_is_named(ray_session, tmp_path, clean):
    out = copy_of_clean(clean, tmp_path)
    man = manifest(out)
    man["fingerprint"]["y_norm"] *= 1.5  # as if build() now made another function
    write_doc(out, man)
    line = error_line(invoke("compare", out, "--job", CRASHY))
    assert "now builds a different problem than the one stored" in line
    line = error_line(run_crashy(out, clean.markers, "--shards", 6))
    assert "the job changed since these shards were written" in line
    assert "(differs in: fingerprint: y)" in line and "--overwrite" in line


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


@pytest.mark.parametrize("spec,guess", [
    ("mpl", "'mlp'"),                                         # a typo of a built-in job
    ("robotarm", "'robot_arm'"),
    ("examples/my_job.py", "'examples.my_job:build'"),        # a file path
    ("./examples/my_job.py:build", "'examples.my_job:build'"),
    ("examples/my_job.py:make", "'examples.my_job:make'"),
    ("examples.my_job", "'examples.my_job:build'"),           # a module without :build
    ("mlp.py", "'mlp'"),                                      # a built-in job's file
    ("jobs/mlp.py", "'jobs.mlp:build'"),
    ("examples.my_job:buld", "'examples.my_job:build'"),      # a typo of the function
])
def test_a_likely_job_is_suggested_in_one_line(spec, guess):
    with pytest.raises(JacpipeError) as info:
        resolve_builder(spec)
    message = str(info.value)
    assert f"did you mean {guess}?" in message and "\n" not in message


@pytest.mark.parametrize("spec", ["xyzzy", "no_such_module_xyz:build", "a/b c.py"])
def test_nothing_is_suggested_without_a_likely_job(spec):
    with pytest.raises(JacpipeError) as info:
        resolve_builder(spec)
    assert "did you mean" not in str(info.value)


def test_the_suggestion_runs():
    """What a file path suggests is a job that resolves."""
    from pipeline.problem.problem import did_you_mean

    assert resolve_builder(did_you_mean("examples/my_job.py")).__name__ == "build"
    assert did_you_mean("mlp") == "mlp"


def test_parameters_read_from_source_equal_the_imported_signature():
    """NOTE: [Parameters without imports]: every built-in job, without importing it."""
    from pipeline.problem.problem import job_parameters, static_parameters

    for name in builtin_jobs():
        assert static_parameters(name) == job_parameters(resolve_builder(name)), name


@pytest.mark.parametrize("source, expected", [
    ("def build(n: int = 3, act='tanh', *, flag=False, w=None):\n    pass\n",
     {"n": 3, "act": "tanh", "flag": False, "w": None}),
    ("def build(a, b=2.5):\n    pass\n", {"a": None, "b": 2.5}),
    # anything the source alone cannot settle: the caller imports the module
    ("import torch\ndef build(dtype=torch.float32):\n    pass\n", None),
    ("import functools\n@functools.cache\ndef build(n=3):\n    pass\n", None),
    ("def build(n=3):\n    pass\nbuild = lambda n=4: n\n", None),
    ("from somewhere import build\n", None),
    ("def other(n=3):\n    pass\n", None),
])
def test_parameters_from_source_or_none(tmp_path, monkeypatch, source, expected):
    from pipeline.problem.problem import static_parameters

    (tmp_path / "srcjob.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert static_parameters("srcjob:build") == expected
    import sys

    assert "srcjob" not in sys.modules  # read, never imported


def test_a_typo_in_a_parameter_is_refused_before_torch_is_imported(tmp_path):
    """``run --executor ray`` starts Ray while the job imports: a typo is still caught first."""
    import subprocess
    import sys

    code = ("import atexit, sys\nfrom pipeline.cli import main\n"
            "atexit.register(lambda: print('torch' in sys.modules, 'ray' in sys.modules))\n"
            "sys.argv = ['jacpipe', 'run', 'mlp', '-p', 'nn=3', '--executor', 'ray', "
            "'--out', 'o']\nmain()\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={**env, "PYTHONPATH": __import__("os").getcwd()})
    assert "unknown parameter 'nn'" in done.stderr, done.stderr
    assert done.returncode == 2 and done.stdout.split() == ["False", "False"], (
        done.returncode, done.stdout, done.stderr)
