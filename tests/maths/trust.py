"""Test helpers of the trust tests (issue #13): points, tolerances and odd functions."""

from __future__ import annotations

import torch

from tests.userjobs import OldStyle

DTYPES = [torch.float32, torch.float64]


METHODS = ["rev", "fwd"]


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def point(dtype, n=6):
    return torch.linspace(0.3, 1.7, n, dtype=dtype)


def close(got, ref):
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, **TOL[ref.dtype])


def doubles_its_input(t):
    t.mul_(2)
    return t**2


def old_style_chain(v):
    return OldStyle.apply(v).sum() + (v[:-1] * v[1:].sin()).sum()


def with_item_chain(v):
    return (v**3).sum() * v.sum().item() + (v[:-1] * v[1:].sin()).sum()


#: What :class:`DoubledUnderVmap`'s batching rule multiplies by (2: wrong; 1: right).
WRONG_VMAP_FACTOR = [2.0]


class DoubledUnderVmap(torch.autograd.Function):
    """The identity, whose batching rule multiplies by :data:`WRONG_VMAP_FACTOR`: a
    deliberately wrong vmap rule (a backward built on it is right alone, wrong under vmap)."""

    @staticmethod
    def forward(g):
        return g.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, g):
        return WRONG_VMAP_FACTOR[0] * g, in_dims[0]

    @staticmethod
    def backward(ctx, gg):
        return gg


class ClearsItsGrad(torch.autograd.Function):
    """``3 v``, whose backward clears its ``grad_output`` in place after using it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v):
        return 3 * v

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        out = 3 * g
        g.zero_()
        return out
