"""``pipeline.maths.compiled``: when a pass is compiled, and the eager fallback."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from pipeline.maths import compiled
from pipeline.maths.compiled import CompileFallbackWarning, check_compile, run_pass


class _Fn:
    """A stand-in for a user's function (weakly referenceable)."""

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t * 2


@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile replaced by a wrapper that counts its calls and adds 0 (no compiler)."""
    calls = {"compiled": 0, "built": 0}

    def compile_(fn):
        calls["built"] += 1

        def run(*args):
            calls["compiled"] += 1
            return fn(*args)

        return run

    monkeypatch.setattr(compiled, "_compile", compile_)
    return calls


def test_modes_decide_eager_or_compiled(fake_compile, monkeypatch):
    fn, x = _Fn(), torch.arange(3.0)
    for _ in range(3):
        assert run_pass(fn, "off", lambda: fn, x, compile="off").tolist() == [0.0, 2.0, 4.0]
    assert fake_compile == {"compiled": 0, "built": 0}
    for _ in range(3):
        run_pass(fn, "on", lambda: fn, x, compile="on")
    assert fake_compile == {"compiled": 3, "built": 1}  # compiled once, from the first call
    # auto: eager until the eager seconds reach the price of compiling.
    monkeypatch.setattr(compiled, "PAYBACK_SECONDS", 1e-12)
    run_pass(fn, "auto", lambda: fn, x, compile="auto")
    assert fake_compile["compiled"] == 3
    run_pass(fn, "auto", lambda: fn, x, compile="auto")
    assert fake_compile == {"compiled": 4, "built": 2}
    monkeypatch.setattr(compiled, "PAYBACK_SECONDS", 1e9)
    for _ in range(5):
        run_pass(fn, "auto-long", lambda: fn, x, compile="auto")
    assert fake_compile["built"] == 2


def test_a_failing_compile_falls_back_with_one_warning(monkeypatch):
    def broken(fn):
        def run(*args):
            raise RuntimeError("inductor: no C++ compiler\nlong details")

        return run

    monkeypatch.setattr(compiled, "_compile", broken)
    fn, x = _Fn(), torch.arange(3.0)
    with pytest.warns(CompileFallbackWarning, match=r"no C\+\+ compiler\); running it eagerly"):
        assert run_pass(fn, "k", lambda: fn, x, compile="on").tolist() == [0.0, 2.0, 4.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_pass(fn, "k", lambda: fn, x, compile="on").tolist() == [0.0, 2.0, 4.0]


def _two_forms(monkeypatch, slow: str | None, broken: bool = False) -> list[str]:
    """A compile stand-in whose default and alternative forms record their runs; the
    ``slow`` one ("default" or "alternative") sleeps 0.2 s a call."""
    import time

    runs: list[str] = []

    def compile_(fn, options=None):
        form = "default" if options is None else "alternative"
        if broken and options is not None:
            raise RuntimeError("this inductor setting fails here")

        def run(*args):
            runs.append(form)
            if form == slow:
                time.sleep(0.2)
            return fn(*args)

        return run

    monkeypatch.setattr(compiled, "_compile", compile_)
    return runs


@pytest.mark.parametrize("slow", ["default", "alternative"])
def test_each_pass_keeps_the_faster_of_two_inductor_forms(monkeypatch, slow):
    # NOTE: [two codegens per pass]: the forms alternate, TRIAL_CALLS + 1 timed calls
    # each (the alternative's compiling call untimed), then the faster runs alone.
    runs = _two_forms(monkeypatch, slow)
    fn, x = _Fn(), torch.arange(3.0)
    calls = 1 + 2 * (compiled.TRIAL_CALLS + 1) + 1
    for _ in range(calls):
        assert not compiled.settled(fn, "k")
        assert run_pass(fn, "k", lambda: fn, x, compile="on").tolist() == [0.0, 2.0, 4.0]
    assert compiled.settled(fn, "k")
    trials = compiled.TRIAL_CALLS + 1  # the first timed call of each is not compared
    assert runs.count("default") == 1 + trials and runs.count("alternative") == 1 + trials
    runs.clear()
    for _ in range(3):
        run_pass(fn, "k", lambda: fn, x, compile="on")
    kept = "alternative" if slow == "default" else "default"
    assert runs == [kept] * 3


def test_an_alternative_form_that_fails_leaves_the_default_without_a_warning(monkeypatch):
    runs = _two_forms(monkeypatch, None, broken=True)
    fn, x = _Fn(), torch.arange(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            assert run_pass(fn, "k", lambda: fn, x, compile="on").tolist() == [0.0, 2.0, 4.0]
    assert runs == ["default"] * 5 and compiled.settled(fn, "k")


def test_would_compile_answers_what_run_pass_does(fake_compile, monkeypatch):
    fn, x = _Fn(), torch.arange(3.0)
    assert compiled.would_compile(fn, "k", "on") and not compiled.would_compile(fn, "k", "off")
    monkeypatch.setattr(compiled, "PAYBACK_SECONDS", 1e9)
    run_pass(fn, "a", lambda: fn, x, compile="auto")
    assert not compiled.would_compile(fn, "a", "auto")  # eager until it pays
    unreferenceable = [1]  # a list: not weakly referenceable, never compiled
    assert not compiled.would_compile(unreferenceable, "k", "on")


def test_faster_drops_each_first_timed_call_and_compares_the_least():
    # a form's first call after its compile is slow (fresh buffers): not held against it
    assert compiled.faster([9.0, 1.0, 3.0], [0.5, 2.0, 2.0])
    assert not compiled.faster([0.1, 2.0, 2.0], [9.0, 1.0, 3.0])


def test_a_pass_over_the_size_cap_keeps_the_default_form_untried(monkeypatch):
    runs = _two_forms(monkeypatch, None)
    monkeypatch.setattr(compiled, "ALTERNATIVE_MAX_BYTES", 3 * 8)  # three float64s
    fn = _Fn()
    for _ in range(4):
        run_pass(fn, "big", lambda: fn, torch.arange(4.0, dtype=torch.float64), compile="on")
        assert compiled.settled(fn, "big")
    assert runs == ["default"] * 4
    run_pass(fn, "small", lambda: fn, torch.arange(3.0, dtype=torch.float64), compile="on")
    assert not compiled.settled(fn, "small")  # at the cap: on trial


@pytest.mark.slow
def test_both_inductor_forms_compute_what_eager_does(tmp_path, monkeypatch):
    # The real compiler, both forms (about 10 s): a stencil whose shifted reads the
    # alternative materialises; every call equals eager to rounding.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    real, seen = compiled._compile, []
    monkeypatch.setattr(compiled, "_compile",
                        lambda fn, options=None: seen.append(options) or real(fn, options))

    def stencil(x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        def residual(t):
            p = torch.nn.functional.pad(t, (1, 1))
            return (((3 - 2 * t) * t - p[:-2] - 2 * p[2:] + 1) ** 2).sum()

        grad = torch.func.grad(residual)
        return torch.func.vmap(lambda v: torch.func.jvp(grad, (x,), (v,))[1])(seeds)

    x = torch.linspace(-1, 1, 50, dtype=torch.float64)
    seeds = torch.eye(50, dtype=torch.float64)[:5]
    want = stencil(x, seeds)
    for _ in range(2 + 2 * (compiled.TRIAL_CALLS + 1)):
        torch.testing.assert_close(run_pass(stencil, "k", lambda: stencil, x, seeds,
                                            compile="on"), want, rtol=1e-12, atol=1e-12)
    assert seen == [None, compiled.ALTERNATIVE] and compiled.settled(stencil, "k")


def test_compile_choices():
    assert check_compile(True) == "on" and check_compile(False) == "off"
    assert [check_compile(m) for m in ("auto", "on", "off")] == ["auto", "on", "off"]
    with pytest.raises(ValueError, match="compile must be one of"):
        check_compile("yes")


# ---------------------------------------------------------------------------
# The engine's and the Taylor operators' passes (NOTE: [Compiled row passes])
# ---------------------------------------------------------------------------

_W = torch.linspace(-1, 1, 12 * 7, dtype=torch.float64).reshape(12, 7)


def _tanh_layer(t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(t @ _W).sin()


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return (t**3).sum() + (t[1:] * t[:-1]).sin().sum()


def _point(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.linspace(-0.9, 0.8, math.prod(shape), dtype=dtype).reshape(shape)


def _engine_cases() -> dict[str, tuple]:
    """name -> (call(compile) -> rows, torch's reference)."""
    from pipeline.maths.engine import batched_rows, hessian_rows, jacobian_rows

    x, xs, xh = _point(3, 12), _point(4, 12), _point(9)
    jac = torch.autograd.functional.jacobian(_tanh_layer, x).reshape(21, 36)
    per_sample = torch.cat([torch.autograd.functional.jacobian(_tanh_layer, s) for s in xs])
    hess = torch.autograd.functional.hessian(_scalar, xh)
    cases = {}
    for method in ("rev", "fwd"):
        cases[f"jacobian {method}"] = (lambda c, m=method: jacobian_rows(
            _tanh_layer, x, 2, 21, method=m, chunk_size=6, compile=c), jac[2:])
        cases[f"hessian {method}"] = (lambda c, m=method: hessian_rows(
            _scalar, xh, 1, 9, method=m, chunk_size=4, compile=c), hess[1:])
        cases[f"per-sample {method}"] = (lambda c, m=method: batched_rows(
            _tanh_layer, xs, 0, 28, method=m, compile=c), per_sample)
    return cases


@pytest.mark.parametrize("case", sorted(_engine_cases()))
def test_engine_passes_run_compiled_equal_eager(fake_compile, case):
    # compile="on" runs the pure passes (x, basis) -> rows that torch.compile
    # would be given (here run as they are): the same rows as eager and as torch.
    call, ref = _engine_cases()[case]
    eager = call("off")
    assert fake_compile["compiled"] == 0
    got = call("on")
    assert fake_compile["compiled"] >= 1
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_a_compiled_pass_is_keyed_by_function_shape_and_dtype(fake_compile):
    from pipeline.maths.engine import jacobian_rows

    def g(t):
        return t.sin() * 2

    x = _point(6)
    for _ in range(3):
        jacobian_rows(g, x, 0, 6, compile="on")
    assert fake_compile["built"] == 1  # the same function, shape and dtype: compiled once
    jacobian_rows(g, _point(7), 0, 7, compile="on")  # a new shape
    jacobian_rows(g, x.float(), 0, 6, compile="on")  # a new dtype
    got = jacobian_rows(lambda t: t.cos(), x, 0, 6, compile="on")  # a new function
    assert fake_compile["built"] == 4
    torch.testing.assert_close(got, torch.diag(-x.sin()))
    jacobian_rows(g, x, 0, 4, chunk_size=2, compile="on")  # a new chunk shape
    assert fake_compile["built"] == 5


def test_an_eager_pass_keeps_no_function_alive():
    import gc
    import weakref

    from pipeline.maths.engine import jacobian_rows

    def make():
        big = torch.ones(5)
        return lambda t: t * big

    fn = make()
    dead = weakref.ref(fn)
    for mode in ("auto", "off"):
        jacobian_rows(fn, _point(5), 0, 5, compile=mode)
    del fn
    gc.collect()
    assert dead() is None


def test_engine_falls_back_to_eager_where_compiling_fails(monkeypatch):
    from pipeline.maths.engine import hessian_rows, jacobian_rows

    def broken(fn):
        def run(*args):
            raise RuntimeError("inductor: no C++ compiler")

        return run

    monkeypatch.setattr(compiled, "_compile", broken)
    x = _point(3, 12)
    ref = torch.autograd.functional.jacobian(_tanh_layer, x).reshape(21, 36)
    for method in ("rev", "fwd"):
        with pytest.warns(CompileFallbackWarning, match="running it eagerly") as caught:
            got = jacobian_rows(_tanh_layer, x, 0, 21, method=method, compile="on")
        assert len([w for w in caught if w.category is CompileFallbackWarning]) == 1
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    xh = _point(9)
    with pytest.warns(CompileFallbackWarning):
        got = hessian_rows(_scalar, xh, 0, 9, compile="on")
    torch.testing.assert_close(got, torch.autograd.functional.hessian(_scalar, xh))


def test_the_checks_see_the_compiled_rows(fake_compile):
    # The vmap spot check and the forward-mode check compare compiled rows with
    # plain autograd as they do eager ones (tests/maths/test_checks.py's cases).
    from pipeline.maths import checks
    from pipeline.maths.checks import VmapMismatchWarning
    from pipeline.maths.engine import jacobian_rows
    from tests.maths.test_checks import cdist_rows, no_grad_product

    x = torch.linspace(-0.7, 0.9, 15, dtype=torch.float64)
    ref = torch.autograd.functional.jacobian(cdist_rows, x)
    with pytest.warns(VmapMismatchWarning, match="without vmap"):
        got = jacobian_rows(cdist_rows, x, 0, 20, compile="on")
    torch.testing.assert_close(got, ref)
    assert fake_compile["compiled"] >= 1  # the rejected rows were the compiled pass's
    x = _point(6)
    ref = torch.autograd.functional.jacobian(no_grad_product, x)
    log: list[str] = []
    with checks.checking(forward="fallback", log=log):
        got = jacobian_rows(no_grad_product, x, 0, 6, method="fwd", compile="on")
    torch.testing.assert_close(got, ref)
    assert "computed by reverse mode instead" in log[0]


def test_taylor_operators_run_compiled_equal_eager(fake_compile):
    from pipeline.maths.taylor import biharmonic, laplacian, taylor

    def f(p):
        return torch.tanh(p @ _W[:, :3]).sum(-1) + (p**3).sum()

    pts = _point(4, 12)
    lap_ref = torch.stack([torch.autograd.functional.hessian(f, p).trace() for p in pts])
    for c in ("off", "on"):
        torch.testing.assert_close(laplacian(f, batched=True, compile=c)(pts), lap_ref)
    assert fake_compile["compiled"] == 1
    weights = torch.linspace(0.5, 2, 12, dtype=torch.float64)
    for op in (lambda c: laplacian(f, batched=True, weights=weights, compile=c),
               lambda c: laplacian(f, batched=True, samples=4, compile=c),
               lambda c: biharmonic(f, batched=True, compile=c)):
        eager, got = op("off")(pts), op("on")(pts)
        torch.testing.assert_close(got, eager, rtol=1e-12, atol=1e-10)
    v = _point(4, 12).flip(0)
    eager, got = (taylor(f, 3, batched=True, compile=c)(pts, v) for c in ("off", "on"))
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=1e-12)
    assert fake_compile["built"] == 5


@pytest.mark.slow
def test_engine_and_taylor_passes_compiled_by_torch_equal_eager(tmp_path, monkeypatch):
    # Real torch.compile (inductor, gcc) on the rev/fwd Jacobian, the Hessian and
    # a per-sample pass and on a Laplacian: eager's rows to rounding. About 40 s
    # of compiling on 2 loaded cores.
    from pipeline.maths.taylor import laplacian

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cases = _engine_cases()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        for name in ("jacobian rev", "jacobian fwd", "hessian rev", "per-sample rev"):
            call, ref = cases[name]
            torch.testing.assert_close(call("on"), call("off"), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(call("on"), ref, rtol=1e-12, atol=1e-12)

        def f(p):
            return torch.tanh(p @ _W[:, :3]).sum(-1) + (p**3).sum()

        pts = _point(4, 12)
        torch.testing.assert_close(laplacian(f, batched=True, compile="on")(pts),
                                   laplacian(f, batched=True, compile="off")(pts),
                                   rtol=1e-12, atol=1e-12)


def test_first_passes_and_detections_import_no_dynamo():
    # NOTE: [eager passes without torch._dynamo]: u ** 3 under vmap(jvp) runs a
    # Python reference whose torch._disable_dynamo wrapper would import dynamo,
    # and torch.func's reverse mode reads torch._dynamo.compiled_autograd.
    # Once something imports dynamo (torch.compile), it is the real module.
    code = (
        "import sys, torch\n"
        "from jobs import heat\n"
        "from pipeline.maths.engine import hessian_rows, jacobian_rows\n"
        "from pipeline.sparse.detect import trace_sparsity\n"
        "p = heat.build(N=6, pattern=False)\n"
        "fn = lambda u: p.fn(u) + u ** 3\n"
        "ref = torch.autograd.functional.jacobian(fn, p.x).reshape(36, 36)\n"
        "for method in ('fwd', 'rev'):\n"
        "    got = jacobian_rows(fn, p.x, 0, 36, method=method, compile='off')\n"
        "    torch.testing.assert_close(got, ref)\n"
        "f = lambda t: (100 * (t[1:] - t[:-1] ** 2) ** 2).sum()\n"
        "x = torch.linspace(-1, 1, 12, dtype=torch.float64)\n"
        "assert trace_sparsity(f, x, kind='hessian').pattern.nnz == 12 + 2 * 11\n"
        "h = torch.autograd.functional.hessian(f, x)\n"
        "torch.testing.assert_close(hessian_rows(f, x, 0, 12, compile='off'), h)\n"
        "print('torch._dynamo' in sys.modules)\n"
        "c = torch.compile(lambda t: t.sin() * 2, backend='eager')\n"
        "torch.testing.assert_close(c(x), x.sin() * 2)\n"
        "import torch._dynamo\n"
        "print(type(torch._dynamo).__name__, torch._dynamo is sys.modules['torch._dynamo'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "module", "True"]


def test_compile_option_reaches_the_dense_passes(tmp_path, fake_compile):
    # --compile on, through the CLI and the in-process executor, to a dense
    # shard's row chunks (kinds.iter_rows -> engine), with its rows right.
    from typer.testing import CliRunner

    from pipeline import read_jacobian
    from pipeline.cli import app
    from pipeline.problem.problem import build_problem

    problem = build_problem("mlp", {"n": 6, "m": 5})
    ref = torch.autograd.functional.jacobian(problem.fn, problem.x).reshape(5, -1)
    for flag in ("off", "on"):
        before = fake_compile["compiled"]
        result = CliRunner().invoke(app, ["run", "mlp", "-p", "n=6", "-p", "m=5", "--executor",
                                          "local", "--compile", flag, "--out",
                                          str(tmp_path / flag), "--no-progress"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert (fake_compile["compiled"] > before) == (flag == "on")
        got = read_jacobian(tmp_path / flag)
        np.testing.assert_allclose(np.asarray(got).reshape(ref.shape), ref.numpy(),
                                   rtol=1e-5, atol=1e-6)
