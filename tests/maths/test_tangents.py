"""``pipeline.maths.tangents``: forward mode through constant matrices without zero tangents.

NOTE: [Constant weights in forward mode]. Every case compares forward-mode
``jacobian_rows`` with ``torch.autograd.functional.jacobian`` and says whether
the mode took the product, so a pattern that silently stopped being taken fails.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd.functional import jacobian

import pipeline.maths.engine as engine
import pipeline.maths.tangents as tangents
from pipeline.maths.engine import jacobian_rows
from pipeline.maths.tangents import constant_products

F = torch.nn.functional
D = torch.float64
G = torch.Generator().manual_seed(7)
W = torch.randn(9, 4, generator=G, dtype=D)
B = torch.randn(9, generator=G, dtype=D)
W2 = torch.randn(4, 3, generator=G, dtype=D)
MLP = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 9)).double()


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=D)


TAKEN = {
    "W @ h": (lambda t: W @ t.sin(), _x(4)),
    "W @ H": (lambda t: W @ t.sin(), _x(4, 3)),
    "h @ W2": (lambda t: torch.tanh(t) @ W2, _x(4)),
    "H @ W2, mm": (lambda t: torch.mm(torch.tanh(t), W2), _x(5, 4)),
    "torch.mv": (lambda t: torch.mv(W, t.exp()), _x(4)),
    "F.linear, 1-d": (lambda t: F.linear(t.cos(), W, B), _x(4)),
    "F.linear, 3-d, no bias": (lambda t: F.linear(t.cos(), W), _x(2, 3, 4)),
    "F.linear by keywords": (lambda t: F.linear(input=t.cos(), weight=W, bias=B), _x(3, 4)),
    "nn.Sequential with weights that require grad": (lambda t: MLP(t), _x(5, 4)),
}

NOT_TAKEN = {
    "x @ x": (lambda t: t.reshape(2, 2) @ t.reshape(2, 2), _x(4)),
    "a matrix that depends on x": (lambda t: (W * t.sum()) @ t, _x(4)),
    "a 3-d operand (batched matmul)": (lambda t: W2.T @ t.sin(), _x(2, 4, 5)),
    "no product": (lambda t: t.sin() * 3, _x(4)),
}


@pytest.fixture
def every_matrix(monkeypatch):
    """Take products with small matrices too (the default leaves those under 2^16 alone)."""
    monkeypatch.setattr(tangents, "MIN_NUMEL", 0)


def _taken(fn, x) -> bool:
    eye = torch.eye(x.numel(), dtype=x.dtype).reshape(-1, *x.shape)
    with constant_products() as mode:
        torch.func.vmap(lambda v: torch.func.jvp(fn, (x,), (v,))[1])(eye)
    return mode.hits > 0


@pytest.mark.parametrize("name", sorted(TAKEN) + sorted(NOT_TAKEN))
def test_forward_rows_equal_autograd_whether_or_not_a_product_is_taken(name, every_matrix):
    fn, x = TAKEN.get(name) or NOT_TAKEN[name]
    assert _taken(fn, x) == (name in TAKEN)
    ref = jacobian(fn, x).reshape(-1, x.numel())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forward mode agrees with reverse: kept
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch's jvp decomps
        for chunk in (None, 2):
            got = jacobian_rows(fn, x, 0, ref.shape[0], method="fwd", chunk_size=chunk)
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)


def test_small_matrices_are_left_to_pytorch():
    fn, x = TAKEN["W @ h"]
    assert W.numel() < tangents.MIN_NUMEL and not _taken(fn, x)
    big = torch.randn(300, 256, generator=G, dtype=D)
    assert big.numel() >= tangents.MIN_NUMEL and _taken(lambda t: big @ t.sin(), _x(256))


def test_a_function_without_products_runs_without_the_mode_after_its_first_call():
    fn, x = NOT_TAKEN["no product"]
    jacobian_rows(fn, x, 0, 4, method="fwd")
    decided = engine._CONSTANT_PRODUCTS[fn]
    assert decided and not any(decided.values())

    def refuse(*args, **kwargs):
        raise AssertionError("the mode ran again")

    real = tangents.constant_products
    tangents.constant_products = refuse
    try:
        got = jacobian_rows(fn, x, 0, 4, method="fwd")
    finally:
        tangents.constant_products = real
    torch.testing.assert_close(got, jacobian(fn, x))


def test_a_wrong_rule_is_caught_by_the_forward_check(monkeypatch, every_matrix):
    from pipeline.maths.checks import ForwardModeWarning

    real = tangents._Product.jvp
    monkeypatch.setattr(tangents._Product, "jvp",
                        staticmethod(lambda ctx, a_t, b_t, _: 2 * real(ctx, a_t, b_t, _)))
    from pipeline.maths import checks

    fn, x = TAKEN["W @ h"]
    with pytest.warns(ForwardModeWarning, match="kept"):  # an explicit method="fwd": reported
        jacobian_rows(fn, x, 0, 9, method="fwd")
    with pytest.warns(ForwardModeWarning, match="reverse mode instead"), checks.checking(
            forward="fallback"):  # method "auto": computed again by reverse mode
        got = jacobian_rows(fn, x, 0, 9, method="fwd")
    torch.testing.assert_close(got, jacobian(fn, x), rtol=1e-12, atol=1e-13)


def test_weights_and_their_grads_are_untouched(every_matrix):
    before = [p.detach().clone() for p in MLP.parameters()]
    x = _x(5, 4)
    jacobian_rows(MLP, x, 0, 45, method="fwd")
    for p, b in zip(MLP.parameters(), before, strict=True):
        assert p.grad is None and torch.equal(p, b)


@pytest.mark.parametrize("which", ["product", "linear"])
def test_a_graph_recorded_through_the_rules_backpropagates_as_autograd(which, every_matrix):
    """The rules' backward (a pass that records a graph through them: weights that
    require grad) gives autograd's gradients."""
    w = torch.randn(6, 4, generator=G, dtype=D, requires_grad=True)
    b = torch.randn(6, generator=G, dtype=D, requires_grad=True)
    x = _x(3, 4)
    fn = ((lambda t: (w @ t.sin().T).sum(1)) if which == "product"
          else (lambda t: F.linear(t.sin(), w, b)))

    def grads(use_mode: bool):
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            if use_mode:
                with constant_products():
                    out = torch.func.jvp(fn, (xg,), (torch.ones_like(xg),))[0]
            else:
                out = fn(xg)
            inputs = (xg, w) if which == "product" else (xg, w, b)
            return torch.autograd.grad(out.square().sum(), inputs)

    for got, ref in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)


def test_torch_func_inside_fn_still_vectorises(every_matrix):
    """The rules' backward runs under ``fn``'s own ``torch.func.grad`` (forces from an
    energy): plain ops, no new leaves; no fallback to rows one at a time."""
    fn = lambda t: torch.func.grad(lambda z: torch.tanh(W @ z).pow(2).sum())(t)  # noqa: E731
    x = _x(4)
    assert _taken(fn, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        got = jacobian_rows(fn, x, 0, 4, method="fwd")
    torch.testing.assert_close(got, jacobian(fn, x), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("call", ["mm with a vector", "mv with a matrix"])
def test_a_product_pytorch_refuses_is_refused_inside_the_mode_too(call, every_matrix):
    fn = ((lambda t: torch.tanh(torch.mm(W, t))) if call == "mm with a vector"
          else (lambda t: torch.tanh(torch.mv(W, t))))
    x = _x(4) if call == "mm with a vector" else _x(4, 2)
    with pytest.raises(RuntimeError):
        fn(x)
    with pytest.raises(RuntimeError):  # the mode does not take it: PyTorch's error
        _taken(fn, x)
