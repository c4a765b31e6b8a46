"""Lennard-Jones energy of a small atom cluster: a scalar whose third derivatives are rows.

``E(r) = sum_{i<j} 4 (s^12 / d_ij^12 - s^6 / d_ij^6)`` over ``atoms`` atoms
in 3-D (``n = 3 atoms`` inputs). Its third-derivative tensor (anharmonic force
constants) has ``n (n + 1) / 2`` rows ``grad d^2 E / dx_j dx_k``, ``j <= k``.

    jacpipe run lennard_jones -p atoms=10
"""

from __future__ import annotations

import torch

from jobs._common import dtype_of, generator, positive
from pipeline import Problem


def build(atoms: int = 5, dtype: str = "float64", seed: int = 0, cutoff: float = 0.0,
          pattern: str = "none") -> Problem:
    """Build the Lennard-Jones problem.

    Args:
        atoms: atoms of the cluster (``3 * atoms`` inputs).
        dtype: float32 or float64.
        seed: seed of the positions (a jittered cubic lattice, spacing 1.1).
        cutoff: pairs farther apart than this at the built positions are left
            out of the energy (a fixed neighbour list); 0 keeps every pair.
        pattern: the Hessian's sparsity for the third-derivative rows: ``none``,
            ``known`` (from the neighbour list: rows of non-neighbours are zero
            and skipped) or ``auto`` (detected by tracing the energy).
    """
    from pipeline import JacpipeError

    positive("atoms", atoms)
    if pattern not in ("none", "known", "auto"):
        raise JacpipeError(f"pattern must be none, known or auto, got {pattern!r}")
    dt = dtype_of(dtype)
    g = generator(seed)
    side = max(1, round(atoms ** (1 / 3) + 0.5))
    grid = torch.stack(torch.meshgrid(*[torch.arange(side, dtype=dt)] * 3, indexing="ij"), -1)
    pos = grid.reshape(-1, 3)[:atoms] * 1.1
    pos = pos + 0.05 * torch.randn(atoms, 3, generator=g, dtype=dt)
    i, j = torch.triu_indices(atoms, atoms, offset=1)
    if cutoff > 0:
        near = ((pos[i] - pos[j]) ** 2).sum(-1).sqrt() < cutoff
        i, j = i[near], j[near]

    def energy(r: torch.Tensor) -> torch.Tensor:
        p = r.reshape(atoms, 3)
        d2 = ((p[i] - p[j]) ** 2).sum(-1)
        inv6 = d2.reciprocal() ** 3
        return (4 * (inv6 * inv6 - inv6)).sum()

    sparsity = {"none": None, "auto": "auto", "known": lambda: _hessian_pattern(atoms, i, j)}
    chosen = sparsity[pattern]
    return Problem(fn=energy, x=pos.reshape(-1), kind="third",
                   sparsity=chosen() if callable(chosen) else chosen)


def _hessian_pattern(atoms: int, i: torch.Tensor, j: torch.Tensor):  # noqa: ANN202
    """The Hessian's pattern: 3 x 3 blocks of each atom with itself and its neighbours."""
    import numpy as np
    import scipy.sparse as sp

    a = np.concatenate([np.arange(atoms), i.numpy(), j.numpy()])
    b = np.concatenate([np.arange(atoms), j.numpy(), i.numpy()])
    blocks = sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(atoms, atoms))
    return sp.kron(blocks, np.ones((3, 3))).tocsr().astype(bool)
