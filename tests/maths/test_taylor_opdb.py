"""Taylor mode against nested forward mode on every op of PyTorch's operator database.

For each op with ``supports_forward_ad``, on its first float64 CPU samples:
``f(x) = op(x, *args, **kwargs)`` (its first floating output) is
differentiated along a random direction ``v`` to orders 2 and 3 by
``taylor(f, order=3)`` and by three nested ``torch.func.jvp``; they agree to
1e-10 relative (scaled by ``max(1, |ref|)``), whether the op has a rule or
goes through the fallback. Samples where the reference itself fails (no
higher-order forward AD, non-floating input) or the op is random are skipped
with a counted reason.
"""

from __future__ import annotations

import collections
import time
import warnings

import pytest
import torch

from pipeline.maths.taylor import RULES, RandomOpError, TaylorFallbackWarning, taylor

SAMPLES_PER_OP = 1
RTOL = 1e-10
# Ops that draw random numbers or whose output is not a function of the input's values.
RANDOM = {"normal", "bernoulli", "multinomial", "uniform", "cauchy", "exponential", "geometric",
          "log_normal", "poisson", "rand_like", "randn_like", "randint_like", "empty",
          "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


def _ops():
    from torch.testing._internal.common_methods_invocations import op_db

    return [op for op in op_db if op.supports_forward_ad
            and torch.float64 in op.supported_dtypes("cpu")]


def _first_floating(out):
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, (tuple, list)):
        for o in out:
            got = _first_floating(o)
            if got is not None:
                return got
    return None


# torch's own nested forward mode is wrong at order 2 for these (their jvp formulas are not
# differentiable again; reverse mode is wrong at order 3): the reference is nested jvp over
# the op decomposed into ATen ops (torch's decompositions, torch's derivatives).
DECOMPOSED_REFERENCE = ("nn.functional.layer_norm", "nn.functional.batch_norm",
                     "nn.functional.instance_norm", "nn.functional.group_norm",
                     "native_batch_norm", "native_layer_norm")
# torch's derivative of entr continues -(1 + log x) to x < 0, where entr is the constant -inf.
QUIRKS = {"special.entr": "torch's jvp formula is not the derivative of entr at x < 0",
          "_native_batch_norm_legit": "mutates its arguments (running statistics)",
          "_batch_norm_with_update": "mutates its arguments (running statistics)"}


def _reference(f, x, v, order, decomposed=False):
    if decomposed:
        from torch.fx.experimental.proxy_tensor import make_fx

        from pipeline.maths.taylor._trace import decompositions

        f = make_fx(torch.func.functionalize(f), decomposition_table=decompositions())(x)
    g = f
    for _ in range(order):
        g = (lambda h: lambda t: torch.func.jvp(h, (t,), (v,))[1])(g)
    return g(x)


def _references(op, f, x, v):
    """Orders 2 and 3 by nested jvp; over the decomposed op where torch's own formulas fail."""
    decomposed = op.name in DECOMPOSED_REFERENCE
    try:
        return [_reference(f, x, v, k, decomposed) for k in (2, 3)]
    except RuntimeError as exc:  # ZeroTensor writes inside torch's jvp formulas
        if "ZeroTensors are immutable" not in str(exc):
            raise
        return [_reference(f, x, v, k, True) for k in (2, 3)]


def _check_sample(op, sample) -> str:
    """'ok', 'fallback' or a skip reason; raises AssertionError on a mismatch."""
    x, rest = sample.input, None
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        x, rest = x[0], list(x[1:])  # a list input (cat, stack): its first tensor varies
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return "skip: input is not a non-empty floating tensor"
    if op.name.split(".")[-1] in RANDOM or "dropout" in op.name:
        return "skip: random or uninitialized op"
    if op.name in QUIRKS:
        return f"skip: {QUIRKS[op.name]}"
    if op.variant_test_name == "subgradients_at_zero":
        return "skip: a non-differentiable point (torch picks a subgradient)"
    args, kwargs = sample.args, sample.kwargs

    def f(t):
        first = t if rest is None else [t, *rest]
        return _first_floating(op.op(first, *args, **kwargs))

    x = x.detach().clone()
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # deprecations of the op itself are not ours
        try:
            y = f(x)
            if y is None:
                return "skip: no floating output"
            refs = _references(op, f, x, v)
        except Exception as exc:  # the reference itself fails: not ours to judge
            return f"skip: reference fails ({type(exc).__name__}: {str(exc)[:60]})"
        del caught[:]
        try:
            got = taylor(f, order=3)(x, v)
        except RandomOpError:
            return "skip: random op refused"
    for k, ref in zip((2, 3), refs, strict=True):
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        assert got[k].shape == ref.shape, (op.name, k, got[k].shape, ref.shape)
        both_nan = torch.isnan(ref) & torch.isnan(got[k])
        diff = torch.where(both_nan, 0.0, got[k] - ref)
        err = float(diff.abs().max()) if ref.numel() else 0.0
        assert err <= RTOL * scale, f"{op.name} order {k}: |err| {err:.3g} (scale {scale:.3g})"
    fell = any(issubclass(w.category, TaylorFallbackWarning) for w in caught)
    return "fallback" if fell else "ok"


@pytest.mark.slow  # the whole operator database: about a minute
def test_every_op_matches_nested_forward_mode():
    t0 = time.perf_counter()
    tally: collections.Counter = collections.Counter()
    failures, slow = [], []
    names = collections.defaultdict(list)
    for op in _ops():
        torch.manual_seed(0)  # sample_inputs draws from the global generator
        try:
            samples = list(op.sample_inputs("cpu", torch.float64, requires_grad=False))
        except Exception:
            tally["skip: no samples"] += 1
            continue
        for sample in samples[:SAMPLES_PER_OP]:
            t1 = time.perf_counter()
            try:
                result = _check_sample(op, sample)
                tally[result] += 1
                names[result].append(op.name)
            except AssertionError as exc:
                failures.append(str(exc))
            except Exception as exc:  # ours raised: a failure
                failures.append(f"{op.name}: {type(exc).__name__}: {str(exc)[:200]}")
            slow.append((time.perf_counter() - t1, op.name))
    seconds = time.perf_counter() - t0
    print(f"\nop_db: {dict(tally)} in {seconds:.1f} s; slowest: {sorted(slow)[-5:]}")
    for reason, ops in sorted(names.items()):
        if reason != "ok":
            print(f"  {reason}: {', '.join(ops)}")
    assert not failures, f"{len(failures)} ops disagree:\n" + "\n".join(failures)
    assert tally["ok"] + tally["fallback"] > 300


def test_core_ops_have_rules():
    core = ["mul", "add", "sub", "mm", "addmm", "bmm", "tanh", "exp", "sin", "cos", "log",
            "div", "pow", "sigmoid", "sqrt", "rsqrt", "erf", "relu", "convolution", "view",
            "sum", "mean", "cat", "where", "amax", "gather", "index"]
    missing = [name for name in core if name not in RULES]
    print(f"\n{len(RULES)} ATen ops have Taylor rules: {sorted(RULES)}")
    assert not missing


@pytest.mark.parametrize("name", ["add", "tanh", "mm"])
def test_ops_with_rules_do_not_fall_back(name):
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(o for o in op_db if o.name == name)
    sample = next(iter(op.sample_inputs("cpu", torch.float64, requires_grad=False)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaylorFallbackWarning)
        assert _check_sample(op, sample) == "ok"
