"""``pipeline.maths.peel``: reverse-mode rows that start below a last matrix product.

NOTE: [Rows whose last operation is a matrix product]. Every case compares
``jacobian_rows`` with ``torch.autograd.functional.jacobian`` and says whether
the peel applies, so a case that silently stopped peeling fails too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd.functional import jacobian

import pipeline.maths.peel as peel_module
from pipeline.maths.engine import jacobian_rows
from pipeline.maths.peel import peel
from tests.maths.trust import ClearsItsGrad

F = torch.nn.functional
D = torch.float64
G = torch.Generator().manual_seed(3)
W = torch.randn(5, 4, generator=G, dtype=D)
B = torch.randn(5, generator=G, dtype=D)
W2 = torch.randn(4, 3, generator=G, dtype=D)
W_INF = W.clone()
W_INF[1, 2] = float("inf")  # the identity's rows are nan there, autograd's too
LIN = torch.nn.Linear(4, 5).double()  # weights that require grad, as a module's do
MLP = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).double()


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=D)


PEELED = {
    "W @ x": (lambda t: W @ t, _x(4)),
    "W @ exp(x) + b - 2": (lambda t: (W @ t.exp() + B) - 2.0, _x(4)),
    "b - W @ exp(x)": (lambda t: B - W @ t.exp(), _x(4)),
    "add(b, W @ exp(x), alpha=3)": (lambda t: torch.add(B, W @ t.exp(), alpha=3.0), _x(4)),
    "addmv(beta=0.5, alpha=2)": (lambda t: torch.addmv(B, W, t.tanh(), beta=0.5, alpha=2.0),
                                 _x(4)),
    "F.linear, 1-d": (lambda t: F.linear(t.tanh(), W, B), _x(4)),
    "F.linear, 2-d": (lambda t: F.linear(t.sin(), W, B), _x(3, 4)),
    "F.linear, 2-d, no bias": (lambda t: F.linear(t.sin(), W), _x(3, 4)),
    "x @ W.T": (lambda t: t.sin() @ W.T, _x(3, 4)),
    "addmm(alpha=-2)": (lambda t: torch.addmm(B, t.tanh(), W.T, beta=0.5, alpha=-2.0),
                        _x(3, 4)),
    "nn.Linear, 1-d": (lambda t: LIN(t.cos()), _x(4)),
    "nn.Linear, 2-d, reshaped": (lambda t: LIN(t.cos()).reshape(-1), _x(3, 4)),
    "nn.Sequential mlp": (lambda t: MLP(t), _x(6, 4)),
    "W2 @ X": (lambda t: W2 @ t.tanh(), _x(3, 6)),
    "W2 @ X.T": (lambda t: W2 @ t.tanh().T, _x(6, 3)),
    "tanh(W @ x + b)": (lambda t: torch.tanh(W @ t + B), _x(4)),
    "tanh(x @ W.T), 2-d": (lambda t: torch.tanh(t @ W.T), _x(3, 4)),
    "relu at exact zeros": (lambda t: torch.relu(W @ t), torch.tensor([0.0, 0, 0, 0], dtype=D)),
    "sigmoid(2 * (W2 @ X) / 3 - 1)": (lambda t: torch.sigmoid(2 * (W2 @ t) / 3 - 1), _x(3, 6)),
    "(W2 @ X) * c, c broadcast": (lambda t: (W2 @ t.sin()) * B[:3], _x(3, 3)),
    "c / (W @ x), c constant": (lambda t: B / (W @ t.exp()), _x(4)),
    "softplus(nn.Sequential mlp)": (lambda t: F.softplus(MLP(t)), _x(6, 4)),
}

NOT_PEELED = {
    "x @ x": (lambda t: t.reshape(2, 2) @ t.reshape(2, 2), _x(4)),
    "a weight that depends on x": (lambda t: (W * t.sum()) @ t, _x(4)),
    "a residual": (lambda t: W[:4] @ t + t, _x(4)),
    "a broadcast that grows the output": (
        lambda t: (W @ t).unsqueeze(0) + torch.zeros(3, 1, dtype=D), _x(4)),
    "a hook on the output": (lambda t: _hooked(W @ t), _x(4)),
    "a product of two terms in x": (lambda t: (W @ t) * (W @ t.sin()), _x(4)),
    "a factor that grows the output": (lambda t: (W @ t) * torch.ones(3, 1, dtype=D), _x(4)),
    "an infinite derivative (sqrt at 0)": (lambda t: torch.sqrt(W @ t),
                                           torch.zeros(4, dtype=D)),
    "a weight with inf": (lambda t: W_INF @ t.sin(), _x(4)),
    "a softmax last": (lambda t: torch.softmax(W @ t, 0), _x(4)),
}


def _hooked(y: torch.Tensor) -> torch.Tensor:
    y.register_hook(lambda g: 2 * g)  # autograd's Jacobian includes it
    return y


def _peels(fn, x) -> bool:
    xg = x.clone().requires_grad_(True)
    return peel(fn(xg), xg) is not None


@pytest.mark.parametrize("name", sorted(PEELED) + sorted(NOT_PEELED))
def test_rows_equal_autograd_whether_or_not_the_last_product_is_peeled(name):
    fn, x = PEELED.get(name) or NOT_PEELED[name]
    assert _peels(fn, x) == (name in PEELED)
    ref = jacobian(fn, x).reshape(-1, x.numel())
    m = ref.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the spot check agrees: no fallback
        for start, stop, chunk in ((0, m, None), (1, m - 1, 2), (2, 3, None)):
            torch.testing.assert_close(jacobian_rows(fn, x, start, stop, chunk_size=chunk),
                                       ref[start:stop], rtol=1e-12, atol=1e-13,
                                       equal_nan=True)


def test_the_engine_peels_a_perceptron_and_leaves_its_weights_and_grads_alone():
    before = [p.detach().clone() for p in MLP.parameters()]
    x = _x(6, 4)
    seen = []
    real = peel_module.peel

    def spy(y, xg):
        seen.append(real(y, xg))
        return seen[-1]

    peel_module.peel = spy
    try:
        got = jacobian_rows(MLP, x, 0, 30, chunk_size=7)
    finally:
        peel_module.peel = real
    assert len(seen) == 1 and seen[0] is not None
    torch.testing.assert_close(got, jacobian(MLP, x).reshape(30, -1), rtol=1e-12, atol=1e-13)
    for p, b in zip(MLP.parameters(), before, strict=True):
        assert p.grad is None
        assert torch.equal(p, b)


def test_a_backward_that_writes_into_the_peeled_cotangents_leaves_the_weights_alone():
    w = W.clone()
    fn = lambda t: w @ ClearsItsGrad.apply(t.sin())  # noqa: E731
    x = _x(4)
    assert _peels(fn, x)
    ref = jacobian(fn, x)
    for _ in range(3):
        torch.testing.assert_close(jacobian_rows(fn, x, 0, 5), ref, rtol=1e-12, atol=1e-13)
    assert torch.equal(w, W)


def test_wrong_peeled_rows_are_caught_by_the_spot_check(monkeypatch):
    from pipeline.maths.checks import VmapMismatchWarning

    real = peel_module._rows_of

    def doubled(w, scale):
        rows = real(w, scale)
        return lambda a, b: 2 * rows(a, b)

    monkeypatch.setattr(peel_module, "_rows_of", doubled)
    fn, x = PEELED["W @ exp(x) + b - 2"]
    with pytest.warns(VmapMismatchWarning):
        got = jacobian_rows(fn, x, 0, 5)
    torch.testing.assert_close(got, jacobian(fn, x), rtol=1e-12, atol=1e-13)


def test_float32_mlp_rows_equal_jacrev():
    from jobs import mlp

    p = mlp.build(n=64, m=48, hidden=32)
    assert _peels(p.fn, p.x)
    torch.testing.assert_close(jacobian_rows(p.fn, p.x, 0, 48), torch.func.jacrev(p.fn)(p.x))


def _hook_on_intermediate(t: torch.Tensor) -> torch.Tensor:
    h = W @ t
    if h.requires_grad:
        h.register_hook(lambda g: 3 * g)
    return h + B


def _prehook_on_the_product(t: torch.Tensor) -> torch.Tensor:
    h = W @ t.sin()
    if h.requires_grad:
        h.grad_fn.register_prehook(lambda grads: tuple(2 * g for g in grads))
    return h + B


def _hook_on_an_elementwise_output(t: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(W @ t)
    if h.requires_grad:
        h.register_hook(lambda g: g * torch.arange(1.0, 6.0, dtype=D))  # one row more than others
    return h * 2


def _hook_on_one_unsampled_row(t: torch.Tensor) -> torch.Tensor:
    from pipeline.maths import checks

    m = W_TALL.shape[0]
    row = next(i for i in range(m) if i not in checks.spot_rows(m, 0, m))
    mask = torch.ones(m, dtype=D)
    mask[row] = 3.0
    h = W_TALL @ t
    if h.requires_grad:
        h.register_hook(lambda g: g * mask)
    return h + 1.0


W_TALL = torch.randn(200, 3, generator=G, dtype=D)
LEGACY = torch.nn.Linear(4, 5).double()
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    LEGACY.register_backward_hook(lambda m, gi, go: tuple(None if g is None else 3 * g
                                                          for g in gi))

HOOKED = {
    "a tensor hook below the output": (_hook_on_intermediate, _x(4)),
    "a pre-hook on the product's node": (_prehook_on_the_product, _x(4)),
    "a hook on an elementwise node's output": (_hook_on_an_elementwise_output, _x(4)),
    "a hook on one row the spot check does not pick": (_hook_on_one_unsampled_row, _x(3)),
    "a legacy module backward hook": (LEGACY, _x(4)),
    "an infinite alpha": (lambda t: torch.add(B, W @ t, alpha=float("inf")), _x(4)),
}


@pytest.mark.parametrize("name", sorted(HOOKED))
def test_hooks_and_infinite_factors_the_walk_cannot_see_give_autograd_rows(name):
    """NOTE: [A peel checked by the graph it skips]: every chunking, one-row chunks
    and ranges included, gives autograd's rows without a warning."""
    fn, x = HOOKED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy hook's own
        ref = jacobian(fn, x).reshape(-1, x.numel())
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", FutureWarning)
        m = ref.shape[0]
        for start, stop, chunk in ((0, m, None), (0, m, 1), (2, 3, None), (1, m, 2)):
            torch.testing.assert_close(jacobian_rows(fn, x, start, stop, chunk_size=chunk),
                                       ref[start:stop], rtol=1e-12, atol=1e-13,
                                       equal_nan=True)
