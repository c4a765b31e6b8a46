import torch

from pipeline import Problem


def build(n: int = 1000, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x = torch.randn(n, generator=g, dtype=torch.float64)
    return Problem(fn=lambda v: torch.tanh(w @ v), x=x)   # kind="jacobian" by default
