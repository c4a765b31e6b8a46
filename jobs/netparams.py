"""Small CNN with batch norm (eval mode): Jacobians of its logits with respect to its parameters.

Conv(3 -> c, 3x3) -> BatchNorm -> ReLU -> 2x2 average pool -> Conv(c -> 2c) ->
ReLU -> global average pool -> Linear(2c -> classes), seeded weights and
batch-norm statistics, seeded images of shape (3, side, side). The problem is
``Problem.from_module(net, images)`` (kind ``params``): the result is
(batch, classes, P), each row one logit's gradient over the flattened
parameters, whose names and offsets the manifest's fingerprint records.
"""

from __future__ import annotations

import torch
from torch import nn

from jobs._common import dtype_of, generator, positive
from pipeline import Problem


def network(channels: int = 4, classes: int = 10, seed: int = 0) -> nn.Module:
    """The seeded network, in eval mode (batch norm uses its seeded running statistics)."""
    torch.manual_seed(seed)  # nn's own initialisation: seeded, so every worker agrees
    c = channels
    net = nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * c, classes),
    )
    g = generator(seed + 1)
    bn = net[1]
    bn.running_mean.copy_(0.1 * torch.randn(c, generator=g))
    bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return net.eval()


def build(batch: int = 8, channels: int = 4, side: int = 8, classes: int = 10,
          dtype: str = "float32", seed: int = 0) -> Problem:
    """Build the per-image parameter-Jacobian problem.

    Args:
        batch: number of seeded images.
        channels: channels of the first convolution (the second has twice as many).
        side: image height and width.
        classes: logits per image (rows per sample).
        dtype: float32 or float64.
        seed: seed of the weights, statistics and images.
    """
    for name, value in (("batch", batch), ("channels", channels), ("side", side),
                        ("classes", classes)):
        positive(name, value)
    dt = dtype_of(dtype)
    net = network(channels, classes, seed).to(dt)
    images = torch.rand(batch, 3, side, side, generator=generator(seed + 2),
                        dtype=torch.float64).to(dt)
    return Problem.from_module(net, images)
