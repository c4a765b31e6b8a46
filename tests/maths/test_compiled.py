"""``pipeline.maths.compiled``: when a pass is compiled, and the eager fallback."""

from __future__ import annotations

import warnings

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


def test_compile_choices():
    assert check_compile(True) == "on" and check_compile(False) == "off"
    assert [check_compile(m) for m in ("auto", "on", "off")] == ["auto", "on", "off"]
    with pytest.raises(ValueError, match="compile must be one of"):
        check_compile("yes")
