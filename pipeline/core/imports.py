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

NOTE: [forward mode without sympy]
    Forward mode meets sympy on its first binary op with a constant operand
    (``0.5 * u``, ``u * w`` with ``w`` not dual): the undefined tangent is an
    efficient zero tensor, whose kernel finds the result's shape by running
    the op's Meta kernel, and torch 2.13 registers its Python references
    (``torch._refs.mul``) as the Meta kernels. Those run
    ``torch._prims_common.elementwise_dtypes``, which imports sympy to ask
    ``isinstance(x, sympy.Basic)``, and ``_broadcast_shapes``, which asks
    ``symbolic_shapes`` four helpers: the 0.55 s of a small sparse Jacobian's
    first evaluation. While sympy is not imported no ``sympy.Basic`` can
    exist, so :func:`spare_sympy_import` points that one import (its
    ``IMPORT_NAME``; the function object and so every reference to it stay
    the same) at a module whose ``Basic`` is sympy's own once sympy is
    imported and, until then, a class nothing is an instance of; and the
    stand-in answers the plain-``int``/``bool`` helpers of :data:`_PLAIN`
    itself (exactly what the real ones do for plain values), anything else
    going to the real module. Applied only where the code is the one this was
    written against (torch 2.13, ``sympy`` named once, by that import).

NOTE: [forward mode without TorchScript decompositions]
    torch 2.13's first ``make_dual`` (every ``jvp``) imports
    ``torch._decomp.decompositions_for_jvp``, which TorchScript-compiles
    eleven decompositions (0.17-0.38 s of a fresh process on this loaded
    machine, the largest first-call cost of a forward-mode pass once sympy is
    gone). Forward mode uses them only for the derivatives of backward ops
    (``_softmax_backward_data``, ``native_layer_norm_backward``,
    ``nll_loss_backward``, the batch-norm backwards: forward over reverse);
    ``trace`` and ``log_sigmoid_forward`` have Python decompositions that
    work without them. Backward ops run inside the autograd engine, so
    :func:`defer_jvp_decompositions` makes ``make_dual``'s load wait for the
    first backward that runs while a forward-AD level is open (both names
    of ``_engine_run_backward`` wrapped, as ``torch.compiler`` patches
    them), loads them there with torch's own function and puts the backward
    back. ``make_dual``'s stand-in stays: torch's function only imports the
    module, a no-op from then on, and dynamo knows that function by the
    object it found when it first built its trace rules: in a process that
    had compiled before the load, the original swapped back was a skipped
    function, and every forward-mode graph compiled after the load broke in
    two at ``make_dual`` (a compiled HVP pass ran 10-25x slower). A
    first-order ``jvp`` never loads them. An aten backward op called
    directly on dual tensors, outside any backward, would meet torch's own
    ``NotImplementedError``: loud, never a wrong value.
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
    if torch is None or not str(getattr(torch, "__version__", "")).startswith("2.13."):
        return False
    defer_jvp_decompositions()
    if _NAME in sys.modules or _PARENT not in sys.modules:
        return False
    stand_in = _LazySymbolicShapes(_NAME)
    sys.modules[_NAME] = stand_in
    setattr(sys.modules[_PARENT], _CHILD, stand_in)
    _spare_dtype_sympy()
    return True


_DEFERRED: dict[str, Any] = {}


def defer_jvp_decompositions() -> bool:
    """NOTE: [forward mode without TorchScript decompositions]; True if deferred now.

    A no-op once done, once the decompositions are loaded, or where torch's
    functions are not the ones this was written against.
    """
    forward_ad = sys.modules.get("torch.autograd.forward_ad")
    graph = sys.modules.get("torch.autograd.graph")
    autograd = sys.modules.get("torch.autograd")
    if _DEFERRED or forward_ad is None or graph is None or autograd is None:
        return False
    if "torch._decomp.decompositions_for_jvp" in sys.modules:
        return False
    load = getattr(forward_ad, "_maybe_load_decompositions", None)
    run = getattr(graph, "_engine_run_backward", None)
    if load is None or run is None or getattr(autograd, "_engine_run_backward", None) is not run:
        return False
    if "decompositions_for_jvp" not in load.__code__.co_names + load.__code__.co_consts:
        return False

    def deferred() -> None:
        """``make_dual``'s load, deferred to the first backward under forward mode."""

    def run_backward(*args: Any, **kwargs: Any) -> Any:
        if forward_ad._current_level >= 0 and not _DEFERRED.get("loaded"):
            _DEFERRED["loaded"] = True
            for module in (graph, autograd):
                if module._engine_run_backward is run_backward:
                    module._engine_run_backward = run
            load()  # make_dual's load is an import: `deferred` stays, a no-op from now on
        return run(*args, **kwargs)

    _DEFERRED.update(load=load, run=run)
    forward_ad._maybe_load_decompositions = deferred
    graph._engine_run_backward = autograd._engine_run_backward = run_backward
    return True


_BASIC = "_jacpipe_sympy_basic"  # a sys.modules key, no file (NOTE: [forward mode without sympy])


class _NoSympyBasic:
    """``sympy.Basic`` while sympy is not imported: no object is an instance of it."""


class _SympyBasic(types.ModuleType):
    """What ``elementwise_dtypes``'s ``import sympy`` gets: ``Basic``, real once imported."""

    def __getattr__(self, name: str) -> Any:
        if name != "Basic":
            raise AttributeError(name)
        real = sys.modules.get("sympy")
        return _NoSympyBasic if real is None else real.Basic


def _spare_dtype_sympy() -> bool:
    """``elementwise_dtypes`` without importing sympy (NOTE: [forward mode without sympy])."""
    prims_common = sys.modules.get("torch._prims_common")
    fn = getattr(prims_common, "elementwise_dtypes", None)
    code = getattr(fn, "__code__", None)
    if code is None or code.co_names.count("sympy") != 1:
        return False  # another torch, or done already
    import dis

    uses = [i.opname for i in dis.get_instructions(code) if i.argval == "sympy"]
    if uses != ["IMPORT_NAME", "STORE_FAST", "LOAD_FAST", "LOAD_FAST"]:
        return False
    sys.modules.setdefault(_BASIC, _SympyBasic(_BASIC))
    fn.__code__ = code.replace(co_names=tuple(
        _BASIC if name == "sympy" else name for name in code.co_names))
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


def _plain_only(name: str, kinds: tuple[type, ...], answer: Any) -> Any:
    """``symbolic_shapes.<name>``: ``answer`` when every argument's type is one of ``kinds``."""

    def helper(*args: Any) -> Any:
        if all(type(a) in kinds for a in args):
            return answer(*args)
        return getattr(_real(), name)(*args)  # symbolic, or the real one's own error

    helper.__name__ = helper.__qualname__ = name
    return helper


_B, _I, _S = (bool,), (bool, int), (bool, int, float)
#: The helpers the stand-in answers for plain values, each as the real one does for them.
_PLAIN: dict[str, Any] = {
    "expect_true": expect_true,
    "sym_eq": sym_eq,
    "guard_or_false": _plain_only("guard_or_false", _B, lambda a: a),
    "guard_or_true": _plain_only("guard_or_true", _B, lambda a: a),
    "guard_bool": _plain_only("guard_bool", _B, lambda a: a),
    "guard_size_oblivious": _plain_only("guard_size_oblivious", _B, lambda a: a),
    "statically_known_true": _plain_only("statically_known_true", _B, lambda a: a),
    "statically_known_false": _plain_only("statically_known_false", _B, lambda a: not a),
    "guarding_hint_or_throw": _plain_only("guarding_hint_or_throw", _I, lambda a: a),
    "has_guarding_hint": _plain_only("has_guarding_hint", _S, lambda a: True),
    "is_nested_int": _plain_only("is_nested_int", _S, lambda a: False),
    "sym_and": _plain_only("sym_and", _B, lambda *a: all(a)),
    "sym_or": _plain_only("sym_or", _B, lambda *a: any(a)),
}


class _LazySymbolicShapes(types.ModuleType):
    """``torch.fx.experimental.symbolic_shapes`` until it is imported (NOTE above)."""

    def __getattr__(self, name: str) -> Any:
        if name in _PLAIN:
            return _PLAIN[name]
        if name.startswith("__") and name != "__all__":  # `from` imports probe __path__
            raise AttributeError(name)
        return getattr(_real(), name)
