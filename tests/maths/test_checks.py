"""``pipeline.maths.checks``: every engine call checks its rows (forward vs reverse, vmap vs none).

References are torch's own: ``torch.autograd.functional.jacobian`` / ``hessian``
(plain autograd, never vmap nor forward mode).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.autograd.functional import hessian, jacobian

from pipeline.core.errors import JacpipeError, OutputTypeError, SparsityError
from pipeline.maths import checks
from pipeline.maths.checks import ForwardModeWarning, VmapMismatchWarning
from pipeline.maths.engine import batched_rows, hessian_rows, jacobian_rows
from pipeline.sparse.coloring import choose_coloring
from pipeline.sparse.compressed import sparse_hessian_rows, sparse_jacobian_rows
from tests.maths.test_adjoint import BROKEN, under_no_grad, with_hook
from tests.maths.trust import DTYPES, close, point


def no_grad_product(v):
    """The issue's case: ``c`` is a constant to autograd, a function of v to forward mode."""
    with torch.no_grad():
        c = 2 * v
    return c * v.sin() + v


def hook_times_ten(v):
    h = v.sin()
    if h.requires_grad:
        h.register_hook(lambda g: g * 10)
    return h * v


def grad_disabled(v):
    with torch.set_grad_enabled(False):
        c = v.exp()
    return c * v


_LIN = torch.nn.Linear(6, 6).double()
_LIN.register_full_backward_hook(lambda module, gin, gout: (gin[0] * 3,))


def module_hook(v):
    return torch.tanh(_LIN(v.double())).to(v.dtype)


#: Functions whose forward mode differs from autograd's reverse mode (elementwise
#: or small, so a diagonal / dense pattern holds).
DISAGREE = {**BROKEN, "no_grad_product": no_grad_product, "hook_x10": hook_times_ten,
            "set_grad_enabled": grad_disabled, "module_hook": module_hook}


def _rows_quietly(*args, **kwargs):
    with checks.checking(forward="fallback", log=[]):
        return jacobian_rows(*args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(DISAGREE))
def test_explicit_forward_mode_warns_and_auto_falls_back(dtype, case):
    fn, x = DISAGREE[case], point(dtype, 10 if case == "padding_idx" else 6)
    ref = jacobian(fn, x).reshape(-1, x.numel())
    with pytest.warns(ForwardModeWarning, match="forward mode's rows kept") as caught:
        fwd = jacobian_rows(fn, x, 0, ref.shape[0], method="fwd")
    assert len([w for w in caught if w.category is ForwardModeWarning]) == 1  # once per call
    assert (fwd - ref).abs().max() > 1e-3  # forward mode's answer, as asked
    log: list[str] = []
    with checks.checking(forward="fallback", log=log):
        close(jacobian_rows(fn, x, 0, ref.shape[0], method="fwd", chunk_size=2), ref)
    assert "computed by reverse mode instead" in log[0]
    assert not any("without vmap" in line for line in log)  # no false alarm in reverse mode


@pytest.mark.parametrize("dtype", DTYPES)
def test_hessian_forward_over_reverse_is_checked(dtype):
    x = point(dtype, 8)

    def fn(t):
        return (no_grad_product(t) ** 2).sum()

    ref = hessian(fn, x)
    with pytest.warns(ForwardModeWarning, match="Hessian rows"):
        assert (hessian_rows(fn, x, 0, 8, method="fwd") - ref).abs().max() > 1e-3
    log: list[str] = []
    with checks.checking(forward="fallback", log=log):
        close(hessian_rows(fn, x, 0, 8, method="fwd", chunk_size=3), ref)
    assert len(log) == 1


def zero_then_hooked(v):
    """Forward and reverse mode agree where a sample is 0, differ elsewhere."""
    return with_hook(v) * v


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_check_sees_samples_past_the_first_ones(dtype):
    xs = torch.zeros(12, 3, dtype=dtype)
    xs[9:] = point(dtype, 9).reshape(3, 3)  # only the last 3 samples show the difference
    ref = torch.cat([jacobian(zero_then_hooked, xs[b]) for b in range(12)])
    with pytest.warns(ForwardModeWarning, match="per-sample rows"):
        fwd = batched_rows(zero_then_hooked, xs, 0, 36, method="fwd")
    assert (fwd - ref).abs().max() > 1e-2
    for chunk in (None, 9):  # the whole batch in one pass, or chunks of 3 samples
        with checks.checking(forward="fallback", log=[]):
            close(batched_rows(zero_then_hooked, xs, 0, 36, method="fwd", chunk_size=chunk), ref)


@pytest.mark.parametrize("case", ["no_grad_product", "hook_x10", "module_hook"])
def test_sparse_column_colouring_is_checked(case):
    fn, x = DISAGREE[case], point(torch.float64, 6)
    ref = jacobian(fn, x)
    pattern = sp.csr_matrix(np.ones((6, 6), dtype=bool)) if case == "module_hook" else sp.eye(6)
    coloring = choose_coloring(pattern)
    assert coloring.mode == "fwd"
    with pytest.warns(ForwardModeWarning, match="sparse Jacobian rows"):
        got = sparse_jacobian_rows(fn, x, 0, 6, pattern, coloring).to_dense(6)
    rel = float((got.detach() - ref).norm() / ref.norm())
    assert rel > 1e-2  # the 0.98 (no_grad), 0.9 (hook x 10)
    log: list[str] = []
    with checks.checking(forward="fallback", log=log):
        got = sparse_jacobian_rows(fn, x, 2, 5, pattern, coloring).to_dense(6)
    close(got, ref[2:5])
    assert len(log) == 1


def test_sparse_hessian_products_are_checked():
    x = point(torch.float64, 8)

    def fn(t):
        return (no_grad_product(t) ** 2).sum()

    ref, pattern = hessian(fn, x), sp.eye(8, format="csr")
    coloring = choose_coloring(pattern, symmetric=True)
    with pytest.warns(ForwardModeWarning, match="sparse Hessian rows"):
        sparse_hessian_rows(fn, x, 0, 8, pattern, coloring)
    for policy in ("fallback", "reverse"):
        with checks.checking(forward=policy, log=[]):
            close(sparse_hessian_rows(fn, x, 0, 8, pattern, coloring).to_dense(8), ref)


def test_agreeing_functions_raise_no_alarm_in_any_mode():
    """pytest turns warnings into errors: these calls must stay silent (and right)."""
    x = point(torch.float32, 6)
    w = torch.linspace(-1, 1, 36).reshape(6, 6)

    def fn(t):
        return torch.tanh(w @ t) * t.sum()

    ref = jacobian(fn, x)
    for method in ("rev", "fwd"):
        close(jacobian_rows(fn, x, 0, 6, method=method), ref)
        close(hessian_rows(lambda t: fn(t).sum(), x, 0, 6, method=method),
              hessian(lambda t: fn(t).sum(), x))
        xs = torch.stack([x, 2 * x, -x])
        close(batched_rows(fn, xs, 0, 18, method=method),
              torch.cat([jacobian(fn, s) for s in xs]))
    pattern = sp.csr_matrix(np.ones((6, 6), dtype=bool))
    got = sparse_jacobian_rows(fn, x, 0, 6, pattern, choose_coloring(pattern)).to_dense(6)
    close(got, ref)


_Y0 = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)


def cdist_rows(t):
    """torch.cdist: its batched backward is wrong (torch.func.jacrev is)."""
    return torch.cdist(t.reshape(-1, 3), _Y0).reshape(-1)


def test_vmap_spot_check_catches_a_wrong_batching_rule():
    x = torch.linspace(-0.7, 0.9, 15, dtype=torch.float64)
    ref = jacobian(cdist_rows, x)
    assert (torch.func.jacrev(cdist_rows)(x) - ref).abs().max() > 0.1  # torch's bug
    with pytest.warns(VmapMismatchWarning, match="without vmap"):
        close(jacobian_rows(cdist_rows, x, 0, 20), ref)
    with pytest.warns(VmapMismatchWarning, match="without vmap"):
        close(jacobian_rows(cdist_rows, x, 3, 20, chunk_size=5), ref[3:])
    xs = x.reshape(5, 3)
    ref = torch.cat([jacobian(cdist_rows, s) for s in xs])
    with pytest.warns(VmapMismatchWarning, match="per-sample rows") as caught:
        close(batched_rows(cdist_rows, xs, 0, 20), ref)
    assert len(caught) == 1
    log: list[str] = []
    with checks.checking(vectorise=False, log=log):  # the run's spot check failed
        close(batched_rows(cdist_rows, xs, 0, 20), ref)
        close(jacobian_rows(cdist_rows, x, 0, 20), jacobian(cdist_rows, x))
    assert log == []


BAD_OUTPUTS = {
    "tuple": lambda t: (t, t),
    "dict": lambda t: {"y": t},
    "list": lambda t: [t],
    "float": lambda t: 1.5,
    "numpy": lambda t: np.ones(3),
    "int tensor": lambda t: (t * 10).long(),
    "bool tensor": lambda t: t > 0,
    "complex": lambda t: t * (1 + 2j),
}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_engine_refuses_outputs_without_a_real_jacobian(case):
    fn, x = BAD_OUTPUTS[case], point(torch.float64, 3)
    eye = sp.eye(3, format="csr")
    calls = [
        lambda: sparse_jacobian_rows(fn, x, 0, 1, eye, choose_coloring(eye)),
        lambda: sparse_hessian_rows(fn, x, 0, 1, eye, choose_coloring(eye, symmetric=True)),
        lambda: jacobian_rows(fn, x, 0, 1),
        lambda: jacobian_rows(fn, x, 0, 1, method="fwd"),
        lambda: hessian_rows(fn, x, 0, 1),
        lambda: batched_rows(fn, x.reshape(3, 1), 0, 1),
    ]
    for call in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fallback may warn before refusing
            with pytest.raises(OutputTypeError) as err:
                call()
        assert isinstance(err.value, JacpipeError)
        assert "\n" not in str(err.value) and "fn(x)" in str(err.value)


def test_sparsity_error_is_a_jacpipe_error():
    assert issubclass(SparsityError, JacpipeError) and issubclass(SparsityError, ValueError)


def test_checks_policy_is_validated_and_reset():
    with pytest.raises(ValueError, match="forward must be one of"):
        with checks.checking(forward="sometimes"):
            pass
    with checks.checking(forward="reverse", vectorise=False):
        assert checks.forward_policy() == "reverse" and not checks.vectorised()
    assert checks.forward_policy() == "warn" and checks.vectorised()


def test_under_no_grad_is_one_of_the_cases():
    assert DISAGREE["no_grad"] is under_no_grad
