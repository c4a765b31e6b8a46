"""``pipeline.maths.layers``: per-layer pieces reassemble ``torch.func``'s parameter Jacobian."""

from __future__ import annotations

import torch

from pipeline.maths.layers import Kron, analyse, column_order, features
from pipeline.problem.module import ModuleFunction
from tests.maths.ntkrefs import images, small_cnn
from tests.maths.test_params import func_reference


def test_pieces_in_column_order_are_the_jacobian():
    net, xs = small_cnn(), images(3)
    fn = ModuleFunction.of(net)
    net_info = analyse(fn, xs[0])
    # convolutions (one without bias), the Linear head; batch norm is the rest
    assert [(i.name, i.bias is not None, i.positions) for i in net_info.layers] == [
        ("0", True, 16), ("3", False, 16), ("6", True, 1), ("8", True, 1)]
    assert net_info.rest == ("1.weight", "1.bias") and net_info.outputs == 3
    pieces = features(fn, xs, net_info)
    assert sum(isinstance(p, Kron) for p in pieces) == 4
    got = torch.cat([p.explicit() for p in pieces], dim=2)
    ref = func_reference(net, xs)[:, :, column_order(fn, net_info)]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    summed = features(fn, xs, net_info, torch.ones(1, 3, dtype=torch.float64))
    torch.testing.assert_close(torch.cat([p.explicit() for p in summed], dim=2),
                               ref.sum(1, keepdim=True), rtol=1e-12, atol=1e-12)
