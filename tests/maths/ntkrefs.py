"""Test helpers: the ``torch.func`` NTK tutorial's Jacobian contraction, and small networks."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap


def tutorial_ntk(net, x1, x2, compute="full"):
    """``empirical_ntk_jacobian_contraction`` of the torch.func tutorial (dict parameters)."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}

    def single(p, x):
        return functional_call(net, {**p, **buffers}, (x.unsqueeze(0),)).squeeze(0)

    jac1 = [j.flatten(2) for j in vmap(jacrev(single), (None, 0))(params, x1).values()]
    jac2 = [j.flatten(2) for j in vmap(jacrev(single), (None, 0))(params, x2).values()]
    expr = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM"}[compute]
    return torch.stack([torch.einsum(expr, a, b) for a, b in zip(jac1, jac2, strict=True)]).sum(0)


def tutorial_full(net, x1, x2):
    """The tutorial's ``(N1, N2, O, O)`` as jacpipe's ``(N1 O, N2 O)``."""
    k = tutorial_ntk(net, x1, x2)
    n1, n2, o, _ = k.shape
    return k.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)


def small_cnn(dtype=torch.float64, seed=0):
    """Strided and padded convolutions, batch norm (eval), a Linear head: every piece kind."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.Tanh(), nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net.to(dtype).eval()


def images(n, dtype=torch.float64, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)
