"""The check of a compressed evaluation (NOTE: [the check of a compressed evaluation]).

One reverse pass over the decompressed rows: a pattern that misses a nonzero
is refused on the first call, in either colouring mode and for Hessians;
forward mode that disagrees with reverse mode is still told apart (reported,
recomputed); the check's pass is compiled exactly when the evaluation's is.
References are torch's own (``torch.autograd.functional``).
"""

from __future__ import annotations

import pytest
import scipy.sparse as sp
import torch
from torch.autograd.functional import hessian, jacobian

from pipeline.core.errors import JacpipeError, SparsityError
from pipeline.maths import checks
from pipeline.sparse.coloring import Coloring, choose_coloring, column_coloring, row_coloring
from pipeline.sparse.compressed import banded_pattern, sparse_hessian_rows, sparse_jacobian_rows
from tests.maths.trust import DTYPES, close, point


def _forward(pattern) -> Coloring:
    colors = column_coloring(pattern)
    return Coloring(colors, int(colors.max()) + 1, "fwd")


def _reverse(pattern) -> Coloring:
    colors = row_coloring(pattern)
    return Coloring(colors, int(colors.max()) + 1, "rev")


def _shifted(x: torch.Tensor) -> torch.Tensor:
    """Tridiagonal plus one entry two places off the diagonal (periodic): not banded(3)."""
    return x**2 + 0.5 * x.roll(1) * x.roll(-1) + 0.3 * x.roll(2)


def _hessian_fn(x: torch.Tensor) -> torch.Tensor:
    """A Hessian with entries three places off the diagonal."""
    return (x**2 * x.roll(3)).sum() + (x.roll(1) * x).sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [_forward, _reverse], ids=["fwd", "rev"])
def test_a_pattern_missing_a_nonzero_is_refused_on_the_first_call(dtype, make):
    x, pattern = point(dtype, 20), banded_pattern(20, 3)
    # the reference: torch's Jacobian really has entries outside the pattern
    ref = jacobian(_shifted, x)
    assert bool((ref.abs() * torch.as_tensor(~pattern.toarray())).max() > 0.1)
    coloring = make(pattern)
    for start, stop in ((0, 20), (4, 9)):  # every row, and a block of them
        with pytest.raises(SparsityError, match="pattern misses nonzeros") as info:
            sparse_jacobian_rows(_shifted, x, start, stop, pattern, coloring)
        assert isinstance(info.value, JacpipeError) and "\n" not in str(info.value)
    full = sp.csr_matrix(ref.abs().numpy() > 0) + banded_pattern(20, 3)  # the true pattern
    got = sparse_jacobian_rows(_shifted, x, 0, 20, full, make(full))
    close(got.to_dense(20), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_hessian_pattern_missing_a_nonzero_is_refused(dtype):
    x, pattern = point(dtype, 16), banded_pattern(16, 3)
    ref = hessian(_hessian_fn, x)
    assert bool((ref.abs() * torch.as_tensor(~pattern.toarray())).max() > 0.1)
    with pytest.raises(SparsityError, match="sparse Hessian rows"):
        sparse_hessian_rows(_hessian_fn, x, 0, 16, pattern, choose_coloring(pattern,
                                                                            symmetric=True))
    full = sp.csr_matrix(ref.abs().numpy() > 0) + sp.eye(16, dtype=bool, format="csr")
    got = sparse_hessian_rows(_hessian_fn, x, 0, 16, full, choose_coloring(full, symmetric=True))
    close(got.to_dense(16), ref)


def test_a_run_shard_skips_the_check():
    # Shards run under check_forward=False (the run's own check covered them):
    # no reverse pass, no refusal; the run's `compare` reports a wrong pattern.
    x, pattern = point(torch.float64, 20), banded_pattern(20, 3)
    with checks.checking(check_forward=False):
        got = sparse_jacobian_rows(_shifted, x, 0, 20, pattern, _forward(pattern))
    assert got.values.numel() == pattern.nnz


def test_forward_mode_disagreement_is_told_from_a_missed_nonzero():
    def no_grad_scaled(v):  # diagonal both ways; forward mode ignores no_grad
        with torch.no_grad():
            c = 2 * v
        return c * v.sin() + v

    x, pattern = point(torch.float64, 8), sp.eye(8, format="csr")
    log: list[str] = []
    with checks.checking(forward="fallback", log=log):
        got = sparse_jacobian_rows(no_grad_scaled, x, 0, 8, pattern, _forward(pattern))
    close(got.to_dense(8), jacobian(no_grad_scaled, x))
    assert len(log) == 1 and "computed by reverse mode instead" in log[0]


def test_the_check_pass_is_compiled_with_the_evaluation(monkeypatch):
    # torch.compile stood in for by a recording wrapper: which passes are built.
    monkeypatch.setenv("JACPIPE_CHECK_EVERY_CALL", "0")  # spaced checks (below)
    from pipeline.maths import compiled

    built: list[str] = []

    def compile_(fn):
        built.append(fn.__code__.co_name)
        return fn

    monkeypatch.setattr(compiled, "_compile", compile_)
    # the first compiled call is checked even where later ones wait their turn
    monkeypatch.setattr(checks, "CHECK_SHARE", 0.0)
    x = point(torch.float64, 30)

    def fn(t):  # a new function per mode: its own passes
        return t**2 + t.roll(1) * t.roll(-1)

    def scalar(t):
        return (t**3).sum() + (t * t.roll(1)).sum()

    pattern = sp.csr_matrix(jacobian(fn, x).abs().numpy() > 0)  # both have the same pattern
    assert sp.csr_matrix(hessian(scalar, x).abs().numpy() > 0).nnz == pattern.nnz
    sparse_jacobian_rows(fn, x, 0, 30, pattern, _forward(pattern), compile="off")
    sparse_hessian_rows(scalar, x, 0, 30, pattern, choose_coloring(pattern, symmetric=True),
                        compile="off")
    assert built == []
    got = sparse_jacobian_rows(fn, x, 0, 30, pattern, _forward(pattern), compile="on")
    assert built == ["entries", "vjp"]  # one chunk: its entries read in the pass
    close(got.to_dense(30), jacobian(fn, x))
    colours = choose_coloring(pattern, symmetric=True)
    got = sparse_hessian_rows(scalar, x, 0, 30, pattern, colours, compile="on")
    assert built == ["entries", "vjp", "entries", "hvp"]
    close(got.to_dense(30), hessian(scalar, x))
    # the call that compiled the check's pass spent the compiler's time, not the
    # check's: the next call is checked (and timed) again, the one after waits
    seen = _count_checks(monkeypatch)
    for _ in range(3):
        sparse_hessian_rows(scalar, x, 0, 30, pattern, colours, compile="on")
    assert len(seen) == 1


def test_every_call_checked_fuses_the_check_into_the_compiled_pass(monkeypatch):
    # NOTE: [the check fused into the pass]: checked every call (the default), one
    # compiled graph returns the compressed matrix and the check's reverse pass;
    # torch.compile stood in for by a recording wrapper (what is built, no compiler).
    from pipeline.maths import compiled

    built: list[str] = []
    monkeypatch.setattr(compiled, "_compile",
                        lambda fn: built.append(fn.__code__.co_name) or fn)
    x = point(torch.float64, 30)

    def fn(t):
        return t**2 + t.roll(1) * t.roll(-1)

    def scalar(t):
        return (t**3).sum() + (t * t.roll(1)).sum()

    pattern = sp.csr_matrix(jacobian(fn, x).abs().numpy() > 0)
    colours = choose_coloring(pattern, symmetric=True)
    for _ in range(2):  # compiled once, reused
        close(sparse_jacobian_rows(fn, x, 0, 30, pattern, _forward(pattern),
                                   compile="on").to_dense(30), jacobian(fn, x))
        close(sparse_hessian_rows(scalar, x, 0, 30, pattern, colours,
                                  compile="on").to_dense(30), hessian(scalar, x))
    assert built == ["fused", "fused"]  # no separate check pass was built
    # in chunks of colours: the pass and the check's run apart, each compiled
    got = sparse_jacobian_rows(fn, x, 0, 30, pattern, _forward(pattern), compile="on",
                               chunk_size=1)
    close(got.to_dense(30), jacobian(fn, x))
    assert built[2:] == ["jvps", "vjp"]
    del built[2:]
    # the verdicts are the check's own: a missed nonzero is refused ...
    narrow = banded_pattern(20, 3)
    with pytest.raises(SparsityError, match="pattern misses nonzeros"):
        sparse_jacobian_rows(_shifted, point(torch.float64, 20), 0, 20, narrow,
                             _forward(narrow), compile="on")
    with pytest.raises(SparsityError, match="sparse Hessian rows"):
        sparse_hessian_rows(_hessian_fn, point(torch.float64, 16), 0, 16, banded_pattern(16, 3),
                            choose_coloring(banded_pattern(16, 3), symmetric=True),
                            compile="on")

    # ... and forward mode that disagrees with reverse mode is recomputed
    def no_grad_scaled(v):
        with torch.no_grad():
            c = 2 * v
        return c * v.sin() + v

    log: list[str] = []
    y, eye = point(torch.float64, 8), sp.eye(8, format="csr")
    with checks.checking(forward="fallback", log=log):
        got = sparse_jacobian_rows(no_grad_scaled, y, 0, 8, eye, _forward(eye), compile="on")
    close(got.to_dense(8), jacobian(no_grad_scaled, y))
    assert len(log) == 1 and "computed by reverse mode instead" in log[0]
    assert built.count("fused") == 5


@pytest.mark.parametrize("every_call", [True, False])
def test_a_call_in_one_chunk_reads_its_entries_inside_the_pass(every_call, monkeypatch):
    # NOTE: [entries read inside the compiled pass]: the pass compiled for a call in
    # one chunk returns B and B.flat[reads] (alone or fused with the check's), and those
    # entries are the call's; a call
    # in chunks compiles the plain pass (recording wrapper, no compiler).
    from pipeline.maths import compiled
    from pipeline.sparse import compressed

    returned: list[tuple] = []

    def compile_(fn, options=None):
        def run(*args):
            out = fn(*args)
            returned.append((fn.__code__.co_name, args, out))
            return out

        return run

    monkeypatch.setattr(compiled, "_compile", compile_)
    scalar, x, pattern, colours = _cubic_case()
    with checks.checking(every_call=every_call):
        for _ in range(3):
            got = sparse_hessian_rows(scalar, x, 0, 30, pattern, colours, compile="on")
            close(got.to_dense(30), hessian(scalar, x))
        # every call checked: the pass fused with the check's ("fused", the entries too)
        calls = [(args, out) for name, args, out in returned if name in ("entries", "fused")]
        assert calls, [name for name, _, _ in returned]
        for args, out in calls:
            b, entries = out[:2]
            assert torch.equal(entries, b.reshape(-1)[args[2].long()])
            assert torch.equal(entries, got.values)
        returned.clear()
        chunked = sparse_hessian_rows(scalar, x, 0, 30, pattern, colours, compile="on",
                                      chunk_size=1)
    assert torch.equal(chunked.values, got.values)
    assert {name for name, _, _ in returned} <= {"hvps", "hvp"} and returned
    plan = next(entry[2] for entry in compressed._PLANS.values() if entry[0] is pattern)
    assert not any(key[0] == "weights" for key in plan.tensors if isinstance(key, tuple))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_fused_graphs_dots_are_the_checks_own(dtype, monkeypatch):
    # The fused graph computes u . (J_P v) as entries . w (w: the check's weight of
    # each entry), (Jᵀu) . v and |Jᵀu|: the same numbers as the dots over the
    # decompressed entries that the passes apart are judged by.
    from pipeline.maths import compiled
    from pipeline.sparse import compressed

    monkeypatch.setattr(compiled, "_compile", lambda fn, options=None: fn)
    seen: list[tuple] = []
    real = compressed._checked_values

    def spy(values, plan, xf, pullback, redo, what, schedule, seconds, fusion=None):
        if fusion is not None and fusion.fused:
            seen.append((values, plan, xf, fusion))
        return real(values, plan, xf, pullback, redo, what, schedule, seconds, fusion)

    monkeypatch.setattr(compressed, "_checked_values", spy)
    x = point(dtype, 40)

    def fn(t):
        return t**2 * t.roll(1) + t.roll(-2).sin()

    def scalar(t):
        return (t**3 * t.roll(1)).sum() + (t * t.roll(3)).cos().sum()

    pattern = sp.csr_matrix(jacobian(fn, x).abs().numpy() > 0)
    close(sparse_jacobian_rows(fn, x, 0, 40, pattern, _forward(pattern),
                               compile="on").to_dense(40), jacobian(fn, x))
    hp = sp.csr_matrix(hessian(scalar, x).abs().numpy() > 0)
    close(sparse_hessian_rows(scalar, x, 0, 40, hp, choose_coloring(hp, symmetric=True),
                              compile="on").to_dense(40), hessian(scalar, x))
    assert len(seen) == 2  # one fused call of each
    for values, plan, xf, fusion in seen:
        assert fusion.dots is not None
        u, v, w, _ = compressed._probe(plan, xf)
        jtu = fusion.pulled.reshape(-1).to(torch.float64)
        want = (float(torch.dot(values.to(torch.float64), w)), float(torch.dot(jtu, v)),
                float(jtu.norm()))
        assert fusion.dots == pytest.approx(want, rel=1e-12)
        assert u is fusion.u and abs(want[0] - want[1]) <= 1e-4 * want[2] * float(v.norm())


def _cubic_case() -> tuple:
    """A new scalar function (its own passes and choices), its point, pattern and colouring."""
    x = point(torch.float64, 30)

    def scalar(t):
        return (t**3).sum() + (t * t.roll(1)).sum()

    pattern = sp.csr_matrix(hessian(scalar, x).abs().numpy() > 0)
    return scalar, x, pattern, choose_coloring(pattern, symmetric=True)


def test_fused_or_apart_is_chosen_by_measured_time(monkeypatch):
    # A fused graph made 0.2 s slower than the passes apart (recording wrapper, no
    # compiler): after FUSION_TRIALS timed calls of each way, apart is kept.
    import time

    from pipeline.maths import compiled
    from pipeline.sparse import compressed

    runs: list[str] = []

    def compile_(fn, options=None):  # both inductor forms (NOTE: [two codegens per pass])
        name = fn.__code__.co_name

        def run(*args):
            runs.append(name)
            if name == "fused":
                time.sleep(0.2)
            return fn(*args)

        return run

    monkeypatch.setattr(compiled, "_compile", compile_)
    scalar, x, pattern, colours = _cubic_case()
    for _ in range(40):  # trials: untimed while a pass compiles or tries its two forms
        close(sparse_hessian_rows(scalar, x, 0, 30, pattern, colours, compile="on").to_dense(30),
              hessian(scalar, x))
        choice = next(iter(compressed._CHOICES[scalar].values()))
        if choice.chosen is not None:
            break
    trials = compressed.FUSION_TRIALS + 1  # the first timed call of each is not compared
    assert choice.chosen is False and len(choice.fused) == len(choice.apart) == trials
    runs.clear()
    for _ in range(3):
        sparse_hessian_rows(scalar, x, 0, 30, pattern, colours, compile="on")
    assert runs == ["entries", "hvp"] * 3  # apart, from the choice on
    choice.record(True, 0.0)  # a kept choice is not timed again nor changed
    assert choice.chosen is False and len(choice.fused) == trials


def test_a_fused_pass_that_fails_to_compile_leaves_the_two_passes_apart(monkeypatch):
    from pipeline.maths import compiled
    from pipeline.maths.compiled import CompileFallbackWarning

    built: list[str] = []

    def compile_(fn):
        built.append(fn.__code__.co_name)
        if fn.__code__.co_name == "fused":
            raise RuntimeError("no fused graph here")
        return fn

    monkeypatch.setattr(compiled, "_compile", compile_)
    scalar, x, pattern, colours = _cubic_case()
    with pytest.warns(CompileFallbackWarning, match="no fused graph here"):
        got = sparse_hessian_rows(scalar, x, 0, 30, pattern, colours, compile="on")
    close(got.to_dense(30), hessian(scalar, x))
    assert built == ["fused"]  # that call ran eagerly, checked by the eager check pass
    got = sparse_hessian_rows(scalar, x, 0, 30, pattern, colours, compile="on")
    close(got.to_dense(30), hessian(scalar, x))
    assert built == ["fused", "entries", "hvp"]  # then apart, each compiled


def _count_checks(monkeypatch) -> list[int]:
    import pipeline.sparse.compressed as compressed

    seen: list[int] = []
    real = compressed._probe
    monkeypatch.setattr(compressed, "_probe", lambda *a: seen.append(1) or real(*a))
    return seen


def test_repeated_calls_are_checked_on_a_schedule_and_a_new_pattern_first(monkeypatch):
    # NOTE: [Spaced checks of repeated evaluations]: checked every call by default;
    # spaced, with no time to spare for checks (CHECK_SHARE = 0), only the first
    # call of each evaluation is.
    seen = _count_checks(monkeypatch)
    monkeypatch.setattr(checks, "CHECK_SHARE", 0.0)
    x = point(torch.float64, 20)
    good = sp.csr_matrix(jacobian(_shifted, x).abs().numpy() > 0)
    coloring = _forward(good)
    for k in range(3):  # by default every call is checked
        sparse_jacobian_rows(_shifted, x + 0.1 * k, 0, 20, good, coloring)
    assert len(seen) == 3
    seen.clear()
    monkeypatch.setenv("JACPIPE_CHECK_EVERY_CALL", "0")  # spaced: the first call of a new one
    x = x + 1e-3
    good = good.copy()  # a new pattern object: a new evaluation
    coloring = _forward(good)
    for k in range(4):
        got = sparse_jacobian_rows(_shifted, x + 0.1 * k, 0, 20, good, coloring)
        close(got.to_dense(20), jacobian(_shifted, x + 0.1 * k))
    assert len(seen) == 1
    with checks.checking(every_call=True):
        sparse_jacobian_rows(_shifted, x, 0, 20, good, coloring)
        sparse_jacobian_rows(_shifted, x, 0, 20, good, coloring)
    assert len(seen) == 3
    monkeypatch.setenv("JACPIPE_CHECK_EVERY_CALL", "1")
    sparse_jacobian_rows(_shifted, x, 0, 20, good, coloring)
    assert len(seen) == 4
    monkeypatch.setenv("JACPIPE_CHECK_EVERY_CALL", "0")
    wrong = banded_pattern(20, 3)  # a new pattern: its first call is checked, and refused
    wrong_colours = _forward(wrong)
    with pytest.raises(SparsityError, match="pattern misses nonzeros"):
        sparse_jacobian_rows(_shifted, x, 0, 20, wrong, wrong_colours)
    with pytest.raises(SparsityError):  # refused again: a refusal is not a passed check
        sparse_jacobian_rows(_shifted, x, 0, 20, wrong, wrong_colours)


def test_a_disagreement_makes_every_later_call_checked(monkeypatch):
    seen = _count_checks(monkeypatch)
    monkeypatch.setattr(checks, "CHECK_SHARE", 0.0)

    def hooked(v):  # diagonal; reverse mode sees the hook, forward mode does not
        h = v.sin()
        if h.requires_grad:
            h.register_hook(lambda g: g * 10)
        return h * v

    x, pattern = point(torch.float64, 6), sp.eye(6, format="csr")
    coloring = _forward(pattern)
    for _ in range(3):
        log: list[str] = []
        with checks.checking(forward="fallback", log=log):
            got = sparse_jacobian_rows(hooked, x, 0, 6, pattern, coloring)
        close(got.to_dense(6), jacobian(hooked, x))
        assert len(log) == 1
    assert len(seen) == 3
