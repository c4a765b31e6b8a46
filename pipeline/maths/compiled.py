"""Compiled AD passes: ``torch.compile`` where the evaluations to come pay for it.

A pass (one vectorised JVP/VJP/HVP over a block of seeds) is a pure function
``pass_(x, seeds)``; what is known of it (eager seconds spent, its compiled
form) is kept per (function, shapes, mode) in :data:`_PASSES`, weakly keyed by
the user's function. The pass is built only to be compiled or run: an eager
one is never kept. ``compile`` picks:

- ``"off"``: eager PyTorch, op by op;
- ``"on"``: ``torch.compile`` from the first call;
- ``"auto"``: eager until the eager seconds spent on this pass reach
  :data:`PAYBACK_SECONDS` (about what compiling costs), then compiled
  (NOTE: [when compiling pays]).

Compiled code is cached on disk by inductor (``TORCHINDUCTOR_CACHE_DIR``,
default ``~/.cache/jacpipe/inductor``, keyed by the traced graph, so a changed
function recompiles), so later processes and Ray workers on the machine skip
code generation. A pass that fails to compile falls back to eager with one
:class:`CompileFallbackWarning`, and stays eager.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
import types
import warnings
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.heap import settle_heap
from pipeline.core.imports import spare_sympy_import
from pipeline.core.options import COMPILE_MODES

# NOTE: [when compiling pays]
# Compiling a vmap(jvp) pass cost 8-30 s on this 2-core machine (heat 10^4:
# 31 s cold, loaded; the 10^6 heat: 15 s), after which a pass ran
# 10-70x faster. How many passes a caller will make is unknown, so "auto"
# follows the ski-rental rule: keep paying eager until the eager time spent
# equals the price of compiling, then compile. It never spends more than
# twice the better of the two choices made with hindsight.
PAYBACK_SECONDS = 10.0


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` failed on a pass; it runs eagerly instead."""


@dataclass
class _Pass:
    """What is known of one pass: nothing that refers to its owner until it is compiled.

    (An entry that referred to its owner would keep it alive in the weak dictionary:
    every function a Newton loop builds, with the tensors it closes over.)
    """

    compiled: Callable[..., Any] | None = None
    eager_seconds: float = 0.0
    failed: bool = False
    #: NOTE: [two codegens per pass]: the trial of inductor's settings, None once one is kept.
    trial: _Trial | None = None


# NOTE: [two codegens per pass]
# How inductor fuses a pass decides its speed, and no one setting is best:
# an intermediate read by several shifted consumers (a stencil, F.pad, a
# roll) is recomputed for each read by default; materialised once
# (``realize_reads_threshold=1``) the compiled HVP pass of BROYDN3D at
# n = 10^5 took 0.47x the default's time and heat's N = 300 JVP pass 0.50x,
# while Rosenbrock's took 1.33x, ARWHEAD's 1.23x and heat's N = 1000 1.4x
# (``python -m benchmarks.forms``, side by side, 2 threads). So each compiled
# pass is compiled with
# both and the faster kept, by measurement: after the default form's first
# call, calls alternate between the two forms (the alternative compiled on
# its first turn; calls that compiled are not timed) until each has
# TRIAL_CALLS timed calls after its first timed one, then the one with the
# least time among those stays (:func:`faster`). The
# second compile costs about what the first did (once per machine: inductor's
# on-disk cache keys the settings); passes with more than ALTERNATIVE_MAX_BYTES
# of tensor arguments are not tried (memory); an alternative that fails to compile or
# run is dropped without a word, the default form stays. Both forms compute
# the same operations, equal to eager to rounding.
#: Inductor settings tried against the default for each compiled pass.
ALTERNATIVE = {"realize_reads_threshold": 1}
#: Timed calls of each form (after its first) before the faster is kept.
TRIAL_CALLS = 3
#: Passes whose tensor arguments hold more bytes than this keep the default form
#: untried: the alternative materialises intermediates of the pass's size, which a
#: chunk sized to the memory budget has not allowed for (heat's 10^6 pass, 40 MB of
#: seeds, ran 1.4x slower with it anyway).
ALTERNATIVE_MAX_BYTES = 2**25


@dataclass
class _Trial:
    """The alternative form of a compiled pass and both forms' timed seconds."""

    other: Callable[..., Any] | None = None
    seconds: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))


_PASSES: weakref.WeakKeyDictionary[Any, dict[Hashable, _Pass]] = weakref.WeakKeyDictionary()


def check_compile(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`COMPILE_MODES` (also True/False for on/off).

    Raises:
        ValueError: anything else.
    """
    if mode is True or mode is False:
        return "on" if mode else "off"
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    return mode


def run_pass(owner: Any, key: Hashable, build: Callable[[], Callable[..., Any]], *args: Any,
             compile: str = "auto", eager: Callable[[], Any] | None = None) -> Any:
    """Run the pass ``build()`` of ``owner`` (built once per ``key``) on ``args``.

    Args:
        owner: the user's function (weakly referenced: its passes go with it).
        key: what else fixes the pass: mode, shapes (the seeds' too), dtype, device.
        build: makes the eager pass function (called once per owner and key).
        *args: the pass's arguments (tensors whose values may change between calls).
        compile: ``"auto"``, ``"on"`` or ``"off"`` (see the module docstring).
        eager: what runs instead of ``build()(*args)`` when the pass runs
            eagerly (the same values, e.g. by a pullback the caller has
            already recorded); ``None``: ``build()(*args)``.

    Returns:
        What the pass returns.
    """
    mode = check_compile(compile)
    spare_dynamo_import()
    run_eager = eager or (lambda: build()(*args))
    if mode == "off":  # nothing to keep nor to count
        return run_eager()
    try:
        passes = _PASSES.setdefault(owner, {})
    except TypeError:  # not weakly referenceable: a pass per call, never compiled
        return run_eager()
    entry = passes.get(key)
    if entry is None:
        entry = passes[key] = _Pass()
    if entry.failed or (
        mode == "auto" and entry.compiled is None and entry.eager_seconds < PAYBACK_SECONDS
    ):
        began = time.perf_counter()
        out = run_eager()
        entry.eager_seconds += time.perf_counter() - began
        return out
    try:
        if entry.compiled is None:
            settle_heap()  # a compiled pass runs again and again (NOTE: [glibc's mmap threshold])
            entry.compiled = _compile(build())  # it keeps its owner alive from now on
            entry.trial = _Trial() if _bytes(args) <= ALTERNATIVE_MAX_BYTES else None
        elif entry.trial is not None:
            return _trial_call(entry, build, args)
        return entry.compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: eager gives the answer
        entry.failed = True
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        warnings.warn(f"torch.compile failed on this pass ({type(exc).__name__}: {first}); "
                      "running it eagerly", CompileFallbackWarning, stacklevel=3)
        return run_eager()


def _trial_call(entry: _Pass, build: Callable[[], Callable[..., Any]], args: tuple) -> Any:
    """One call of a pass on trial: the form with fewer timed calls (NOTE: [two codegens ...])."""
    trial = entry.trial
    assert trial is not None and entry.compiled is not None
    form = 0 if len(trial.seconds[0]) <= len(trial.seconds[1]) else 1
    if form == 1:
        try:
            if trial.other is None:
                trial.other = _compile(build(), ALTERNATIVE)
                return trial.other(*args)  # it compiled: not timed
            began = time.perf_counter()
            out = trial.other(*args)
        except Exception:  # noqa: BLE001 - the alternative is an optimisation: the default stays
            entry.trial = None
            return entry.compiled(*args)
    else:
        began = time.perf_counter()
        out = entry.compiled(*args)
    trial.seconds[form].append(time.perf_counter() - began)
    if min(len(trial.seconds[0]), len(trial.seconds[1])) > TRIAL_CALLS:
        if faster(trial.seconds[1], trial.seconds[0]):
            entry.compiled = trial.other
        entry.trial = None
    return out


def faster(a: list[float], b: list[float]) -> bool:
    """Whether calls timed ``a`` beat calls timed ``b``: the least of each after its first.

    A form's first timed calls after its compile can take 2-3x its steady time
    (fresh buffers, lazy set-up), and noise on a shared machine only adds
    time: the first is dropped and the least of the rest compared.
    """
    return min(a[1:]) < min(b[1:])


def _bytes(args: tuple) -> int:
    """Bytes of the tensors among ``args`` (lists of tensors counted too)."""
    total = 0
    for a in args:
        for t in a if isinstance(a, list | tuple) else (a,):
            nbytes = getattr(t, "nbytes", None)
            total += nbytes if isinstance(nbytes, int) else 0
    return total


def _entry(owner: Any, key: Hashable) -> _Pass | None:
    """What is known of ``owner``'s pass ``key``; None where nothing is (or ``owner`` is not
    weakly referenceable: never compiled)."""
    try:
        return _PASSES.get(owner, {}).get(key)
    except TypeError:
        return None


def settled(owner: Any, key: Hashable) -> bool:
    """Whether ``owner``'s pass ``key`` runs compiled in the form it keeps (its trial is over)."""
    entry = _entry(owner, key)
    return entry is not None and entry.compiled is not None and entry.trial is None


_SERIAL = itertools.count()
_SPARED = False
#: The modules whose ``torch._disable_dynamo``-wrapped references run in eager
#: forward mode (NOTE: [eager passes without torch._dynamo]).
_REFERENCE_MODULES = ("torch._refs", "torch._refs.nn.functional", "torch._refs.special",
                      "torch._refs.linalg", "torch._refs.fft", "torch._prims",
                      "torch._decomp.decompositions")


def spare_dynamo_import() -> int:
    """Let eager passes call torch's Python references without importing ``torch._dynamo``.

    NOTE: [eager passes without torch._dynamo]
        Under ``vmap(jvp)`` a few ops (``u ** 3``: ``aten.pow``) run torch's
        Python reference, wrapped by ``torch._disable_dynamo``, which imports
        ``torch._dynamo`` on its first call to build the wrapper: 1.1 s
        unloaded, 4 s on this loaded 2-core machine, and most of a small
        sparse Jacobian's first evaluation (heat N = 32: 2.4 of 3.2 s). The
        wrapper matters only while dynamo traces or runs compiled code, which
        needs ``torch._dynamo`` imported; so each wrapped reference gets a
        stand-in that calls the reference itself while ``torch._dynamo`` is
        not imported, and builds and keeps the real wrapper once it is (the
        wrapper's own module is one dynamo skips, so it never traces the
        stand-in). Reverse mode (``torch.func.vjp`` / ``grad``) reads
        ``torch._dynamo.compiled_autograd._disable()`` around every backward
        (torch 2.13), which imports ``torch._dynamo`` too (1.1 s idle, 4.9 s
        of a loaded fresh process's first Hessian detection): while dynamo is
        not imported ``torch._dynamo`` is a stand-in module whose
        ``compiled_autograd._disable`` does nothing (compiled autograd cannot
        be on without dynamo) and whose every other attribute imports the real
        module, which replaces the stand-in as any import of it does.

    Returns:
        How many references got a stand-in (0 on later calls: a flag test).
    """
    global _SPARED
    spare_sympy_import()  # NOTE: [backward without sympy]
    if _SPARED:
        return 0
    _SPARED = True
    import torch

    if "torch._dynamo" in sys.modules:
        return 0
    if "_dynamo" not in vars(torch):
        torch._dynamo = _LazyDynamo("torch._dynamo")  # type: ignore[attr-defined]
    code = torch._compile._disable_dynamo(lambda: None).__code__
    if code.co_freevars != ("fn", "recursive"):  # another torch: leave it as it is
        return 0
    spared = 0
    for name in _REFERENCE_MODULES:
        for obj in list(vars(sys.modules.get(name) or types).values()):
            for _ in range(8):  # down the functools.wraps chain to the wrapper
                if type(obj) is types.FunctionType and obj.__code__ is code:
                    cells = dict(zip(code.co_freevars, obj.__closure__ or (), strict=True))
                    spared += _stand_in(cells["fn"].cell_contents, cells["recursive"].cell_contents)
                obj = getattr(obj, "__wrapped__", None)
                if obj is None:
                    break
    return spared


class _LazyDynamo(types.ModuleType):
    """``torch._dynamo`` until it is imported (NOTE: [eager passes without torch._dynamo])."""

    def __getattr__(self, name: str) -> Any:
        if name == "compiled_autograd" and "torch._dynamo" not in sys.modules:
            return types.SimpleNamespace(_disable=contextlib.nullcontext)
        import importlib

        return getattr(importlib.import_module("torch._dynamo"), name)


def _stand_in(fn: Callable[..., Any], recursive: bool) -> int:
    """Give ``fn`` (a reference wrapped by ``torch._disable_dynamo``) a lazy wrapper; 1 if new."""
    if getattr(fn, "__dynamo_disable", None) is not None:
        return 0

    def call(*args: Any, **kwargs: Any) -> Any:
        dynamo = sys.modules.get("torch._dynamo")
        if getattr(dynamo, "disable", None) is None:  # nothing traces without dynamo
            return fn(*args, **kwargs)
        real = dynamo.disable(fn, recursive, wrapping=False)
        fn.__dynamo_disable = real  # type: ignore[attr-defined]
        return real(*args, **kwargs)

    fn.__dynamo_disable = call  # type: ignore[attr-defined]
    return 1


def _compile(fn: Callable[..., Any], options: dict[str, Any] | None = None
             ) -> Callable[..., Any]:
    """``torch.compile(fn)`` (with inductor's ``options``) with its on-disk caches in a
    stable folder.

    NOTE: [one code object per compiled pass]
        dynamo keeps its compiled frames on the *code object* and recompiles
        a code object at most ``recompile_limit`` (8) times, then silently
        runs it eagerly. Every pass of a kind is a closure of one code object
        (``_jvps``'s ``jvps`` for every function and shape), so the ninth
        function or seed shape of a process would never be compiled. Each
        compiled pass therefore enters through a trampoline with a code
        object of its own, and its cache holds that pass's frames only.
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jacpipe", "inductor"))
    import torch
    from torch._inductor import config

    config.fx_graph_cache = True

    def trampoline(*args: Any) -> Any:
        return fn(*args)

    trampoline.__code__ = trampoline.__code__.replace(co_name=f"jacpipe_pass_{next(_SERIAL)}")
    return torch.compile(trampoline, dynamic=False, options=options)


def would_compile(owner: Any, key: Hashable, compile: str) -> bool:
    """Whether :func:`run_pass` of ``owner``'s pass ``key`` under ``compile`` runs compiled now.

    True where it is compiled, or would be compiled on this call (``"on"``, or
    ``"auto"`` once its eager seconds reached :data:`PAYBACK_SECONDS`), and has
    not failed to compile.
    """
    mode = check_compile(compile)
    try:
        entry = _PASSES.get(owner, {}).get(key)
    except TypeError:  # not weakly referenceable: run_pass runs it eagerly
        return False
    if mode == "off":
        return False
    if entry is None:
        return mode == "on"
    if entry.failed:
        return False
    return mode == "on" or entry.compiled is not None or entry.eager_seconds >= PAYBACK_SECONDS


def is_compiled(owner: Any, key: Hashable) -> bool:
    """Whether the pass ``key`` of ``owner`` now runs compiled (a check's pass follows it)."""
    entry = _entry(owner, key)
    return entry is not None and entry.compiled is not None and not entry.failed
