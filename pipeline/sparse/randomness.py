"""Random ops in ``fn``: which ATen ops draw random numbers, and refusing an ``fn`` whose
draws change from call to call (NOTE: [Random ops refused deterministically]).

No SciPy here: the refusal runs before every dense engine call of a job (and a
front-door first call), which need nothing of sparsity detection
(:mod:`pipeline.sparse.rules` and :mod:`pipeline.sparse.detect` re-export
these names).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

from pipeline.core.errors import JacpipeError

__all__ = ["RANDOM", "draws_random", "is_random", "op_name", "refuse_random_ops"]

_RANDOM = ["rand", "randn", "rand_like", "randn_like", "randint", "randint_like",
           "bernoulli", "normal", "uniform", "exponential", "geometric", "cauchy",
           "log_normal", "multinomial", "native_dropout", "dropout", "poisson"]
RANDOM = frozenset(_RANDOM)


def op_name(func: Any) -> str:
    """``aten.mul.Tensor`` -> ``"mul"`` (the overload packet's name)."""
    packet = getattr(func, "overloadpacket", None)
    return getattr(packet, "__name__", str(func)).split(".")[-1]


def is_random(func: Any) -> bool:
    return op_name(func) in RANDOM or torch.Tag.nondeterministic_seeded in getattr(
        func, "tags", ())


def draws_random(func: Any, args: Any = (), kwargs: Any = None) -> bool:
    """Whether this call of ``func`` draws random numbers: :func:`is_random`, except a
    draw whose result is fixed: a dropout that cannot drop (``dropout_p=0``,
    ``train=False``: attention's fused kernels are tagged random for their dropout alone),
    and a dropout or bernoulli with ``p`` 0 or 1 (all kept or all dropped)."""
    if not is_random(func):
        return False
    schema = getattr(func, "_schema", None)
    if schema is None:
        return True
    given = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    given.update(zip((a.name for a in schema.arguments), args, strict=False))
    given.update(kwargs or {})
    for name, value in given.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if (name == "dropout_p" and number and value == 0) or (
                name == "train" and value is False) or (
                name == "p" and number and value in (0, 1) and _fixed_by_p(func)):
            return False  # bernoulli(p=1): F.dropout(p=0) in training mode
    return True


def _fixed_by_p(func: Any) -> bool:
    """Whether ``p`` 0 or 1 fixes the result of ``func`` (bernoulli's probability of a one,
    a dropout's of a zero)."""
    name = op_name(func)
    return "bernoulli" in name or "dropout" in name


def refuse_random_ops(fn: Callable, x: torch.Tensor, spec: str = "job") -> None:
    """Refuse ``fn`` if it draws random numbers that change from call to call.

    NOTE: [Random ops refused deterministically]
        Two evaluations of ``fn`` that happen to agree (``fractional_max_pool2d``
        often draws windows giving the same maxima) do not prove it deterministic.
        Here one forward + backward pass at ``x`` runs under a dispatch mode
        that sees every ATen op and asks :func:`~pipeline.sparse.rules.is_random`
        (the list sparsity detection refuses), recording the state of the
        generator each random op draws from. Only if one is seen, a second pass
        compares those states: a generator seeded inside ``fn`` starts each
        call in the same state (deterministic, accepted); any other draw has
        advanced it, so the refusal never depends on the values drawn.

        A function found deterministic is not watched again in this process
        at the same input shape, dtype and device (and, for a module, the same
        ``training`` flags): repeated ``pipeline.jacobian`` calls (a Newton
        loop, a 100 x 100 closure) paid the watched pass every time, as long
        as the call's own work.

    Raises:
        JacpipeError: ``fn`` uses a random op whose draws differ between calls.
    """
    key = _watch_key(fn, x)
    seen = _DETERMINISTIC.get(fn) if key is not None else None
    if seen is not None and key in seen:
        return
    first = _random_draws(fn, x)
    if not first or first == _random_draws(fn, x):
        if key is not None:
            _DETERMINISTIC.setdefault(fn, set()).add(key)
        return
    names = ", ".join(dict.fromkeys(op for op, _ in first))
    raise JacpipeError(
        f"{spec}: fn uses a random op ({names}) whose draws change from call to call, so its "
        "Jacobian is not defined and workers would disagree; draw the noise once in build "
        "(outside fn) and close over it, or call model.eval() (dropout)")


#: Functions found deterministic, weakly keyed, with the inputs they were watched at.
_DETERMINISTIC: weakref.WeakKeyDictionary[Callable, set[Hashable]] = weakref.WeakKeyDictionary()


def _watch_key(fn: Callable, x: torch.Tensor) -> Hashable | None:
    """What a deterministic verdict on ``fn`` holds for; None: never cached (not weakly
    referenceable)."""
    try:
        weakref.ref(fn)
    except TypeError:
        return None
    cells = [c.cell_contents for c in getattr(fn, "__closure__", None) or ()
             if _filled(c)]
    held = [fn, getattr(fn, "__self__", None), *cells]  # fn, a bound method's owner, closure
    modes = tuple(m.training for h in held if isinstance(h, torch.nn.Module)
                  for m in h.modules())
    return tuple(x.shape), x.dtype, x.device.type, modes


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _random_draws(fn: Callable, x: torch.Tensor) -> list[tuple[str, bytes]]:
    """The random ops one forward + backward pass of ``fn`` at ``x`` runs, with the state
    of the generator each one drew from (those before a failure, if the pass fails)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    draws: list[tuple[str, bytes]] = []

    class Watch(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False  # as sparse/recorder.py's: no torch._dynamo import (~1 s) on the first op

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if is_random(func):
                draws.append((str(func), _generator_state(args, kwargs)))
            return func(*args, **kwargs)

    xr = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad(), Watch():
            y = fn(xr)
            if isinstance(y, torch.Tensor) and y.requires_grad and y.is_floating_point():
                torch.autograd.grad(y.sum(), xr, allow_unused=True)
    except Exception:  # noqa: S110 - fn runs elsewhere with its own checks; this pass only looks
        pass  # (a failing pass fails the same way twice: the draws before it still compare)
    return draws


def _generator_state(args: Any, kwargs: dict) -> bytes:
    """State of the generator a random op draws from: its ``generator=``, else the default
    generator of its device."""
    values = list(args) + list(kwargs.values())
    gen = next((v for v in values if isinstance(v, torch.Generator)), None)
    if gen is None:
        device = kwargs.get("device") or next(
            (v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        device = torch.device(device)
        if device.type == "cuda":
            return bytes(torch.cuda.get_rng_state(device).numpy())
        gen = torch.default_generator
    return bytes(gen.get_state().numpy())
