"""``pipeline.maths.products``: sketches and ``J S Jᵀ`` against the full ``torch.func`` Jacobian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline import JacpipeError
from pipeline.maths.products import Curvature, jsj, omega, omega_rows, sketch
from pipeline.problem.module import ModuleFunction
from tests.maths.ntkrefs import images, small_cnn
from tests.maths.test_layers import tiny_resnet
from tests.maths.test_params import func_reference


def close(got, ref, rtol=1e-10):
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= rtol * float(ref.abs().max())


@pytest.fixture(scope="module")
def cnn():
    net, xs = small_cnn(), images(5)
    return net, xs, func_reference(net, xs)  # (N, O, P)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_sketch_is_j_times_the_seeded_omega(cnn, distribution):
    net, xs, jac = cnn
    p = jac.shape[2]
    om = omega(p, 7, seed=3, distribution=distribution)
    got = sketch(net, xs, 7, seed=3, distribution=distribution, block=2)
    close(got, jac @ om)
    # any block of rows is reproducible on its own
    assert torch.equal(omega(p, 7, seed=3, distribution=distribution, rows=(100, 180)),
                       om[100:180])
    assert not torch.equal(om, omega(p, 7, seed=4, distribution=distribution))


def test_omega_rows_across_a_seed_chunk_and_refusal(cnn):
    r = omega_rows(2)
    whole = omega(r + 10, 2, seed=1)
    torch.testing.assert_close(omega(r + 10, 2, seed=1, rows=(r - 3, r + 4)),
                               whole[r - 3:r + 4], rtol=0, atol=0)
    # a wide sketch: seed chunks of few rows, J formed a few columns at a time
    net, xs, jac = cnn
    k = 3000
    assert omega_rows(k) < 400 < jac.shape[2]
    close(sketch(net, xs[:2], k, seed=5), jac[:2] @ omega(jac.shape[2], k, seed=5))
    with pytest.raises(JacpipeError, match="distribution"):
        omega(4, 2, distribution="uniform")


def test_a_resnet_sketch_streamed_in_a_small_budget_is_the_dense_one():
    # one batch pass per block; a budget of a few KiB: blocks of one sample,
    # a layer per group, Ω a tile at a time
    net, xs = tiny_resnet(), images(2)
    jac = func_reference(net, xs)
    ref = jac @ omega(jac.shape[2], 300, seed=2, distribution="rademacher")
    close(sketch(net, xs, 300, seed=2, distribution="rademacher"), ref)
    close(sketch(net, xs, 300, seed=2, distribution="rademacher", memory_budget=1 << 14), ref)
    net, xs = tiny_resnet(torch.float32), images(2, torch.float32)
    jac = func_reference(net, xs)
    close(sketch(net, xs, 300, seed=2), jac @ omega(jac.shape[2], 300, seed=2,
                                                    dtype=torch.float32), 1e-5)


def test_a_sketch_with_other_parameters_goes_sample_by_sample():
    net, xs = tiny_resnet(extra=nn.GroupNorm(2, 8)), images(2)
    jac = func_reference(net, xs)
    close(sketch(net, xs, 5, seed=1), jac @ omega(jac.shape[2], 5, seed=1))


def test_jsj_diagonal_and_low_rank_match_the_full_jacobian(cnn):
    net, xs, jac = cnn
    p = jac.shape[2]
    g = torch.Generator().manual_seed(0)
    d = torch.rand(p, generator=g, dtype=torch.float64)
    u = torch.randn(p, 3, generator=g, dtype=torch.float64)
    ref = torch.einsum("iop,p,iqp->ioq", jac, d, jac)
    close(jsj(net, xs, Curvature(diagonal=d), block=2), ref)
    close(jsj(net, xs, Curvature(diagonal=d), diagonal=True), torch.diagonal(ref, 0, 1, 2))
    s = u @ u.T + torch.diag(d)
    close(jsj(net, xs, Curvature(diagonal=d, low_rank=u), block=3),
          torch.einsum("iop,pr,iqr->ioq", jac, s, jac))


def test_jsj_kronecker_factors_match_the_full_jacobian(cnn):
    net, xs, jac = cnn
    fn = ModuleFunction.of(net)
    offsets = {r["name"]: r["offset"] for r in fn.layout()}
    p = jac.shape[2]
    g = torch.Generator().manual_seed(1)
    rest = torch.rand(p, generator=g, dtype=torch.float64)

    def psd(n):
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        return a @ a.T / n

    factors = {"6": (psd(6), psd(81)), "3": (psd(5), psd(36))}  # "3" has no bias
    s = torch.zeros(p, p, dtype=torch.float64)
    covered = torch.zeros(p, dtype=torch.bool)
    for name, (q, h) in factors.items():
        d_out, d_in = q.shape[0], getattr(net, name).weight[0].numel()
        idx = torch.tensor([[offsets[f"{name}.weight"] + c * d_in + k if k < d_in else
                             offsets[f"{name}.bias"] + c for k in range(h.shape[0])]
                            for c in range(d_out)]).reshape(-1)
        s[idx[:, None], idx[None, :]] = torch.kron(q, h)
        covered[idx] = True
    s += torch.diag(torch.where(covered, torch.zeros_like(rest), rest))
    got = jsj(net, xs, Curvature(diagonal=rest, kron=factors), block=2)
    close(got, torch.einsum("iop,pr,iqr->ioq", jac, s, jac))


def test_a_three_class_mlp_predictive_variance():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    xs = torch.randn(6, 4, dtype=torch.float64)
    jac = func_reference(net, xs)
    d = torch.rand(jac.shape[2], dtype=torch.float64)
    close(jsj(net, xs, Curvature(diagonal=d), diagonal=True),
          torch.einsum("iop,p,iop->io", jac, d, jac))


def test_curvature_refusals(cnn):
    net, xs, _ = cnn
    with pytest.raises(JacpipeError, match="diagonal must have shape"):
        jsj(net, xs, Curvature(diagonal=torch.ones(3, dtype=torch.float64)))
    with pytest.raises(JacpipeError, match="not Linear / Conv2d"):
        jsj(net, xs, Curvature(kron={"1": (torch.eye(4), torch.eye(4))}))
    with pytest.raises(JacpipeError, match="bias as the last input column"):
        jsj(net, xs, Curvature(kron={"6": (torch.eye(6).double(), torch.eye(80).double())}))
