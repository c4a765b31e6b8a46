"""Imports torch makes on a first call that jacpipe's calls never need.

NOTE: [backward without sympy]
    In torch 2.13 every ``torch.autograd.grad`` or ``backward`` given
    ``grad_outputs`` (every VJP: ``torch.func.vjp``, ``jacrev``, the
    fingerprint's probe, a shard's rows) imports
    ``torch.fx.experimental.symbolic_shapes`` for two helpers
    (``expect_true``, ``sym_eq``) that compare the output's shape with the
    gradient's; that module imports sympy: 0.57 s of a fresh process on this
    machine, paid by the driver and by every Ray worker, and most of a small
    Jacobian's first call. :func:`spare_sympy_import` puts a stand-in module
    in its place while it is not imported: the two helpers answer plain
    ``int``/``bool`` arguments themselves (what an eager backward passes) and
    anything else, like every other attribute, imports the real module, which
    then replaces the stand-in (``sys.modules`` and its package's attribute)
    as any import of it would. Nothing changes once the real module is
    imported (tracing, ``torch.compile`` and fake tensors import it
    themselves).
"""

from __future__ import annotations

import sys
import types
from typing import Any

_NAME = "torch.fx.experimental.symbolic_shapes"
_PARENT, _, _CHILD = _NAME.rpartition(".")


def spare_sympy_import() -> bool:
    """Install the stand-in (NOTE: [backward without sympy]); True if installed now.

    A no-op when torch is not imported yet, when the real module (or the
    stand-in) is already there, or on a torch whose ``symbolic_shapes``
    helpers this was not written against (not 2.13).
    """
    torch = sys.modules.get("torch")
    if torch is None or _NAME in sys.modules or _PARENT not in sys.modules:
        return False
    if not str(getattr(torch, "__version__", "")).startswith("2.13."):
        return False
    stand_in = _LazySymbolicShapes(_NAME)
    sys.modules[_NAME] = stand_in
    setattr(sys.modules[_PARENT], _CHILD, stand_in)
    return True


def _real() -> types.ModuleType:
    """The real ``symbolic_shapes``, imported (the stand-in gives way) if it is not yet."""
    module = sys.modules.get(_NAME)
    if module is None or isinstance(module, _LazySymbolicShapes):
        sys.modules.pop(_NAME, None)
        import importlib

        module = importlib.import_module(_NAME)
        setattr(sys.modules[_PARENT], _CHILD, module)
    return module


def _plain(value: Any) -> bool:
    return type(value) is int or (
        isinstance(value, (tuple, list)) and all(type(v) is int for v in value))


def expect_true(a: Any, skip: int = 0) -> bool:
    """``symbolic_shapes.expect_true`` for a plain bool; anything else goes to the real one."""
    if type(a) is bool:
        return a
    return _real().expect_true(a, skip + 1)


def sym_eq(x: Any, y: Any) -> Any:
    """``symbolic_shapes.sym_eq`` for plain ints and tuples of them; else the real one."""
    if _plain(x) and _plain(y) and isinstance(x, int) == isinstance(y, int):
        return tuple(x) == tuple(y) if not isinstance(x, int) else x == y
    return _real().sym_eq(x, y)


class _LazySymbolicShapes(types.ModuleType):
    """``torch.fx.experimental.symbolic_shapes`` until it is imported (NOTE above)."""

    def __getattr__(self, name: str) -> Any:
        if name == "expect_true":
            return expect_true
        if name == "sym_eq":
            return sym_eq
        if name.startswith("__") and name != "__all__":  # `from` imports probe __path__
            raise AttributeError(name)
        return getattr(_real(), name)
