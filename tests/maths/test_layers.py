"""``pipeline.maths.layers``: per-layer pieces reassemble ``torch.func``'s parameter Jacobian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.maths.layers import Kron, analyse, column_order, features
from pipeline.problem.module import ModuleFunction
from tests.maths.ntkrefs import images, small_cnn
from tests.maths.test_params import func_reference


class _Block(nn.Module):
    """ResNet's basic block, written as torchvision does: in-place ReLU, ``out += identity``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.short(x)
        return self.relu(out)


def tiny_resnet(dtype=torch.float64, width=4, classes=3, extra=None):
    """A ResNet-shaped network (stem, an identity and a strided block, pooled Linear head)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
              nn.ReLU(inplace=True), _Block(width, width, 1), _Block(width, 2 * width, 2)]
    layers += [extra] if extra is not None else []
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(2 * width, classes))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return net.to(dtype).eval()


def _pieces_are_the_jacobian(net, xs, rtol):
    fn = ModuleFunction.of(net)
    info = analyse(fn, xs[0])
    ref = func_reference(net, xs)[:, :, column_order(fn, info)]
    got = torch.cat([p.explicit() for p in features(fn, xs, info)], dim=2)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))
    o = info.outputs
    summed = features(fn, xs, info, torch.ones(1, o, dtype=xs.dtype))
    torch.testing.assert_close(torch.cat([p.explicit() for p in summed], dim=2),
                               ref.sum(1, keepdim=True), rtol=rtol,
                               atol=rtol * float(ref.abs().max()) * o)
    return info


def test_pieces_in_column_order_are_the_jacobian():
    net, xs = small_cnn(), images(3)
    info = _pieces_are_the_jacobian(net, xs, 1e-12)
    # convolutions (one without bias), the Linear head; batch norm a per-channel layer
    assert [(i.name, i.bias is not None, i.positions) for i in info.layers] == [
        ("0", True, 16), ("3", False, 16), ("6", True, 1), ("8", True, 1)]
    assert [(i.name, i.channels, i.positions) for i in info.norms] == [("1", 4, 16)]
    assert info.rest == () and info.dense == ("1.weight", "1.bias") and info.outputs == 3
    assert sum(isinstance(p, Kron) for p in features(ModuleFunction.of(net), xs, info)) == 4


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_a_resnet_with_batch_norm_and_skip_connections_in_one_batch_pass(dtype, rtol):
    info = _pieces_are_the_jacobian(tiny_resnet(dtype), images(3, dtype), rtol)
    assert info.rest == () and len(info.norms) == 6 and len(info.layers) == 7


def test_another_parameter_makes_the_pieces_per_sample():
    # a group norm's parameters are neither Kronecker nor batch-norm columns
    net = tiny_resnet(extra=nn.GroupNorm(2, 8))
    info = _pieces_are_the_jacobian(net, images(2), 1e-10)
    assert info.rest == ("5.weight", "5.bias")
    frozen = tiny_resnet()
    frozen[1].weight.requires_grad_(False)  # a batch norm with only its shift trainable
    info = _pieces_are_the_jacobian(frozen, images(2), 1e-10)
    assert info.norms[0].names == ("1.bias",)
