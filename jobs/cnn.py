"""Small CNN classifier (28x28 image -> 10 logits): input Jacobians per image, batched.

Two 3x3 convolutions with tanh and 2x2 average pooling, then a linear layer to
10 logits; weights and images are drawn from a seed (no downloads). The
problem is per-sample (kind ``batched``) over ``batch`` images of shape
(1, 28, 28): the result is (batch, 10, 784), one 10 x 784 input Jacobian (a
saliency map per class) per image, never the batch² cross terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jobs._common import dtype_of, generator, positive
from pipeline import Problem

SIDE = 28
CLASSES = 10


def _init(g: torch.Generator, *shape: int, fan_in: int) -> torch.Tensor:
    """Seeded weights with variance ``1 / fan_in`` (drawn in float64, then cast)."""
    return torch.randn(*shape, generator=g, dtype=torch.float64) / fan_in**0.5


def build(batch: int = 64, channels: int = 8, dtype: str = "float32", seed: int = 0) -> Problem:
    """Build the CNN's per-image input-Jacobian problem.

    Args:
        batch: number of seeded images.
        channels: channels of the first convolution (the second has twice as many).
        dtype: float32 or float64.
        seed: seed of the weights and of the images.

    Returns:
        A batched :class:`Problem` with ``x`` of shape ``(batch, 1, 28, 28)``.
    """
    positive("batch", batch)
    positive("channels", channels)
    dt = dtype_of(dtype)
    g = generator(seed)
    c1, c2 = channels, 2 * channels
    w1 = _init(g, c1, 1, 3, 3, fan_in=9).to(dt)
    b1 = (0.1 * torch.randn(c1, generator=g, dtype=torch.float64)).to(dt)
    w2 = _init(g, c2, c1, 3, 3, fan_in=9 * c1).to(dt)
    b2 = (0.1 * torch.randn(c2, generator=g, dtype=torch.float64)).to(dt)
    features = c2 * (SIDE // 4) ** 2
    w3 = _init(g, CLASSES, features, fan_in=features).to(dt)
    b3 = (0.1 * torch.randn(CLASSES, generator=g, dtype=torch.float64)).to(dt)
    # Images: a few seeded Gaussian blobs on a dark background, in [0, 1].
    grid = torch.linspace(0, 1, SIDE, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    centres = torch.rand(batch, 3, 2, generator=g, dtype=torch.float64)
    widths = 0.05 + 0.1 * torch.rand(batch, 3, 1, 1, generator=g, dtype=torch.float64)
    d2 = (yy - centres[..., 0, None, None]) ** 2 + (xx - centres[..., 1, None, None]) ** 2
    images = torch.exp(-d2 / (2 * widths**2)).sum(1).clamp(max=1.0)
    x = images.unsqueeze(1).to(dt)  # (batch, 1, 28, 28)

    def fn(image: torch.Tensor) -> torch.Tensor:
        """10 logits of one (1, 28, 28) image."""
        h = F.avg_pool2d(torch.tanh(F.conv2d(image, w1, b1, padding=1)), 2)
        h = F.avg_pool2d(torch.tanh(F.conv2d(h, w2, b2, padding=1)), 2)
        return w3 @ h.reshape(-1) + b3

    return Problem(fn=fn, x=x, kind="batched")
