"""Compiled AD passes: ``torch.compile`` where the evaluations to come pay for it.

A pass (one vectorised JVP/VJP/HVP over a block of seeds) is a pure function
``pass_(x, seeds)`` built once per (function, shapes, mode) and kept in
:data:`_PASSES`, weakly keyed by the user's function. ``compile`` picks:

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

import os
import time
import warnings
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

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
    eager: Callable[..., Any]
    compiled: Callable[..., Any] | None = None
    eager_seconds: float = 0.0
    failed: bool = False


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
             compile: str = "auto") -> Any:
    """Run the pass ``build()`` of ``owner`` (built once per ``key``) on ``args``.

    Args:
        owner: the user's function (weakly referenced: its passes go with it).
        key: what else fixes the pass: mode, shapes, dtype, device.
        build: makes the eager pass function (called once per owner and key).
        *args: the pass's arguments (tensors whose values may change between calls).
        compile: ``"auto"``, ``"on"`` or ``"off"`` (see the module docstring).

    Returns:
        What the pass returns.
    """
    mode = check_compile(compile)
    try:
        passes = _PASSES.setdefault(owner, {})
    except TypeError:  # not weakly referenceable: a pass per call, never compiled
        return build()(*args)
    entry = passes.get(key)
    if entry is None:
        entry = passes[key] = _Pass(build())
    if mode == "off" or entry.failed or (
        mode == "auto" and entry.compiled is None and entry.eager_seconds < PAYBACK_SECONDS
    ):
        began = time.perf_counter()
        out = entry.eager(*args)
        entry.eager_seconds += time.perf_counter() - began
        return out
    try:
        if entry.compiled is None:
            entry.compiled = _compile(entry.eager)
        return entry.compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: eager gives the answer
        entry.failed = True
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        warnings.warn(f"torch.compile failed on this pass ({type(exc).__name__}: {first}); "
                      "running it eagerly", CompileFallbackWarning, stacklevel=3)
        return entry.eager(*args)


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)`` with inductor's on-disk caches in a stable folder."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jacpipe", "inductor"))
    import torch
    from torch._inductor import config

    config.fx_graph_cache = True
    return torch.compile(fn, dynamic=False)
