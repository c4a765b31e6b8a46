"""``pipeline.maths.ntk``: every path against the ``torch.func`` tutorial's contraction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pipeline
from pipeline import JacpipeError
from pipeline.maths.layers import analyse
from pipeline.maths.ntk import estimate, ntk
from pipeline.problem.module import ModuleFunction
from tests.maths.ntkrefs import images, small_cnn, tutorial_full, tutorial_ntk
from tests.maths.test_layers import tiny_resnet

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def close(got, ref):
    scale = float(ref.abs().max())
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert float((got - ref).abs().max()) <= RTOL[ref.dtype] * scale


@pytest.fixture(scope="module")
def refs():
    """The tutorial's kernels of :func:`small_cnn` (float32 and float64), computed once."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        net, x1, x2 = small_cnn(dtype), images(5, dtype), images(3, dtype, seed=2)
        out[dtype] = (net, x1, x2, tutorial_full(net, x1, x2),
                      tutorial_ntk(net, x1, x1, "trace"), tutorial_ntk(net, x1, x2).sum((2, 3)))
    return out


@pytest.mark.parametrize("method, block, dtype", [
    ("contraction", 2, torch.float64), ("ntk-vp", 2, torch.float64),
    ("structured", 2, torch.float64), ("structured", None, torch.float32),
    ("auto", None, torch.float32),
])
def test_every_path_equals_the_tutorial_contraction(refs, method, block, dtype):
    net, x1, x2, full, trace, total = refs[dtype]
    close(ntk(net, x1, x2, method=method, block=block), full)
    close(ntk(net, x1, method=method, block=block, kernel="trace"), trace)  # symmetric
    close(ntk(net, x1, x2, method=method, block=block, kernel="sum"), total)


def test_a_resnet_with_batch_norm_and_skip_connections_equals_the_tutorial():
    net, x1, x2 = tiny_resnet(), images(3), images(2, seed=3)
    k, report = ntk(net, x1, x2, method="structured", report=True)
    close(k, tutorial_full(net, x1, x2))
    assert "kron" in report.layers.values()
    net, x1 = tiny_resnet(torch.float32), images(3, torch.float32)
    close(ntk(net, x1, kernel="trace", block=2), tutorial_ntk(net, x1, x1, "trace"))


def test_auto_picks_the_structured_path_for_wide_dense_layers_and_reports_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 4)).double()
    x = torch.randn(6, 64, dtype=torch.float64)
    k, report = pipeline.ntk(net, x, report=True, block=4)
    assert report.method == "structured" and set(report.layers.values()) == {"kron"}
    assert report.estimates["structured"] < report.estimates["contraction"]
    assert "structured" in str(report)
    close(k, tutorial_full(net, x, x))
    torch.testing.assert_close(k, k.T, rtol=1e-13, atol=1e-13)  # half the blocks, mirrored


def test_many_positions_make_a_convolution_form_its_block():
    net = small_cnn()
    fn = ModuleFunction.of(net)
    a = analyse(fn, images(1)[0])
    few, ways = estimate(a, fn.numel, 2, 2, trace=False, symmetric=False)
    assert set(ways) == {"0", "3", "6", "8"} and ways["6"] == ways["8"] == "kron"
    wide = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2 * 64, 2)).double()
    b = analyse(ModuleFunction.of(wide), images(1)[0])  # 64 positions, d_in 3, d_out 2
    _, ways = estimate(b, 16, 2, 2, trace=False, symmetric=False)
    assert ways["0"] == "explicit" and few["structured"] > 0


def test_refusals():
    net = small_cnn()
    with pytest.raises(JacpipeError, match="kernel must be"):
        ntk(net, images(2), kernel="diag")
    with pytest.raises(JacpipeError, match="training mode"):
        ntk(small_cnn().train(), images(2))
