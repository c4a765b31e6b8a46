"""Randomized smoothing: the Jacobian of ``f_s(x) = E[f(x + sigma * w)]``, with error bars.

A function with a kink at ``x`` (contact, ``relu``, ``max``) has no Jacobian
there; AD returns one one-sided derivative and ``compare --fd`` flags the
input. The Gaussian smoothing ``f_s`` of ``f`` is smooth for any ``sigma > 0``
and its Jacobian has two unbiased Monte Carlo estimators (Suh et al., ICML
2022; Pang et al., T-RO 2023), ``w ~ N(0, I)``, ``sigma`` per input:

==========  ====================================================  ==========================
estimator   sample of ``d f_s / d x_j``                            needs
==========  ====================================================  ==========================
first       ``J(x + sigma w)[:, j]``                              one VJP per row per sample
zeroth      ``f(x + sigma w) w_j / sigma_j``                      one forward per sample
both        first-order values; the zeroth-order estimate beside  both
==========  ====================================================  ==========================

NOTE: [Antithetic pairs]
    Samples come in pairs ``+w, -w`` and the pair average is the Monte Carlo
    sample: first order ``(J(x+) + J(x-)) / 2``, zeroth order
    ``(f(x+) - f(x-)) w_j / (2 sigma_j)``. Pairs are independent, so the
    standard error is ``sqrt(var_pairs / P)`` over ``P = K / 2`` pairs (the
    two members of a pair are not independent and are never counted as two
    samples). The zeroth-order pair cancels ``f(x)`` exactly (the constant
    term's variance ``|f(x)|^2 / sigma^2`` that makes the one-sided estimator
    useless at small sigma), and the first-order pair is exact for a
    quadratic ``f``'s Jacobian (odd terms cancel).

NOTE: [Determinism across shard counts]
    Direction ``w_p`` of pair ``p`` is drawn from
    ``numpy.random.default_rng([seed, p])``: it depends on the seed and the
    pair only, never on the shard or chunk, so every row sees the same
    perturbations whatever the plan, and a resumed shard the same as the
    first attempt.

A shard computes its rows chunk by chunk; for each chunk it runs all ``P``
pairs and keeps running sums (Welford's mean and ``M2``, float64), so a
worker holds two accumulators of one chunk, never ``K`` Jacobians. The part
file is the dense layout plus a ``stderr`` column (``both``: ``zeroth`` and
``zeroth_stderr`` too), all ``fixed_size_list<float>[n]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import KINDS, kind_of
from pipeline.core.smoothing import Smoothing, _numpy

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.problem.problem import Problem

#: Standard errors within which an independent Monte Carlo reference must agree
#: (at least; more for many entries, see :func:`agreement_z`).
MIN_Z = 4.0


def check_problem(smoothing: Smoothing, problem: Problem, job: str) -> None:
    """Refuse a smoothing the problem cannot take (a kind other than ``jacobian``, bad sigmas).

    Raises:
        JacpipeError: one line saying what is supported.
    """
    if not kind_of(problem.kind).smoothable:
        raise JacpipeError(
            f"--smooth: job {job!r} is a {problem.kind} problem; smoothing is implemented "
            f"for the {' and '.join(k.name for k in KINDS.values() if k.smoothable)} kind only"
        )
    smoothing.sigma_vector(problem.x)


def direction(seed: int, pair: int, n: int) -> np.ndarray:
    """``w`` of antithetic pair ``pair``: N(0, I) in float64, from ``(seed, pair)`` only."""
    return np.random.default_rng([int(seed), int(pair)]).standard_normal(n)


class Welford:
    """Running mean and sum of squared deviations of equally shaped samples (float64)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.count = 0
        self.mean = np.zeros(shape)
        self.m2 = np.zeros(shape)

    def add(self, sample: np.ndarray) -> None:
        self.count += 1
        delta = sample - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (sample - self.mean)

    def stderr(self) -> np.ndarray:
        """Standard error of the mean: ``sqrt(var / count)``, ``var`` with ``count - 1``."""
        if self.count < 2:
            return np.full_like(self.mean, np.nan)
        return np.sqrt(self.m2 / ((self.count - 1) * self.count))


RowsAt = Callable[["Tensor", int, int], np.ndarray]


def smoothed_blocks(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    smoothing: Smoothing,
    rows_at: RowsAt,
    start: int,
    stop: int,
    *,
    chunk: int,
    index: np.ndarray | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Smoothed rows ``[start, stop)`` chunk by chunk, with their standard errors.

    Args:
        f: the function (rows over ``f(x).reshape(-1)``).
        x: the point.
        smoothing: sigma, samples, seed, estimator.
        rows_at: ``(point, a, b) -> (b - a, n)`` numpy rows of the Jacobian at
            ``point`` (the engine in a worker, plain autograd in ``compare``).
        start, stop: the rows (positions in ``index`` when it is given).
        chunk: rows per pass.
        index: flat row numbers of the positions, for sampled rows (``rows_at``
            then receives positions too); None: positions are rows.

    Returns:
        An iterator of ``(first_row, {column: (rows, n) float64})``, columns as
        :attr:`Smoothing.columns`.
    """
    import torch

    n = x.numel()
    sigma = smoothing.sigma_vector(x)
    steps = [
        torch.as_tensor(sigma * direction(smoothing.seed, p, n), dtype=x.dtype, device=x.device
                        ).reshape(x.shape)
        for p in range(smoothing.pairs)
    ]
    diffs = None
    pick: Any = slice(start, stop) if index is None else np.asarray(index)[start:stop]
    if smoothing.zeroth:
        # (P, rows): f(x+) - f(x-) on this shard's rows, once for every chunk.
        with torch.no_grad():
            diffs = np.stack([
                _numpy((f(x + s) - f(x - s)).reshape(-1))[pick].astype(np.float64)
                for s in steps
            ]) if stop > start else np.zeros((smoothing.pairs, 0))
    for a in range(start, stop, max(1, chunk)):
        b = min(stop, a + max(1, chunk))
        cols: dict[str, np.ndarray] = {}
        if smoothing.first:
            acc = Welford((b - a, n))
            for s in steps:
                acc.add((rows_at(x + s, a, b).astype(np.float64)
                         + rows_at(x - s, a, b).astype(np.float64)) / 2)
            cols["values"], cols["stderr"] = acc.mean, acc.stderr()
        if diffs is not None:
            acc = Welford((b - a, n))
            for p in range(smoothing.pairs):
                w = direction(smoothing.seed, p, n)
                acc.add(np.outer(diffs[p, a - start:b - start], w / sigma) / 2)
            keys = ("zeroth", "zeroth_stderr") if smoothing.first else ("values", "stderr")
            cols[keys[0]], cols[keys[1]] = acc.mean, acc.stderr()
        yield a, cols


def smoothed_chunk(chunk: int, smoothing: Smoothing, itemsize: int) -> int:
    """Rows per pass of a smoothed shard, from the plain shard's chunk.

    NOTE: a chunk of plain rows holds its ``(rows, n)`` block and the pass's
    activations; a smoothed chunk adds two float64 accumulators per
    estimator (Welford's mean and M2) and two blocks of rows (the pair), so
    it takes ``1 + 2 + 2 * 8 / itemsize * estimators`` blocks' worth (5 to
    9 for float64): the chunk is divided by that to stay in the same budget.
    """
    per = 3 + (2 * 8 // itemsize) * (int(smoothing.first) + int(smoothing.zeroth))
    return max(1, chunk // per)


# ---------------------------------------------------------------------------
# The shard (worker.py dispatches here) and its part schema
# ---------------------------------------------------------------------------


def agreement_z(entries: int) -> float:
    """Standard errors two independent estimates may differ by, over ``entries`` entries.

    NOTE: the max of ``N`` standard normal |z| grows like ``sqrt(2 ln N)``; a
    Bonferroni bound at a 1e-3 false-alarm rate for the whole matrix, and at
    least :data:`MIN_Z`, keeps ``compare`` from failing a correct result by
    chance on a large matrix (Gaussian tails; for heavy tails see the README).
    """
    from statistics import NormalDist

    tail = 1e-3 / (2 * max(1, entries))
    return max(MIN_Z, NormalDist().inv_cdf(1 - tail))


# ---------------------------------------------------------------------------
# compare: an independent Monte Carlo reference, and the bias against plain AD
# ---------------------------------------------------------------------------


@dataclass
class SmoothedCheck:
    """A stored smoothed result against an independent Monte Carlo run (``compare``).

    Args:
        max_abs: max |stored - reference| over the checked entries.
        worst_z: max |stored - reference| / combined standard error (entries
            with a zero standard error count through ``atol`` only).
        worst_ratio: max |stored - reference| / (z * combined stderr + atol); <= 1 passes.
        z: the threshold (:func:`agreement_z`).
        atol: the rounding allowance (``rtol * max |reference|``).
        bias: max |stored - AD Jacobian at x| and where, ``(value, row, col)``.
        max_stderr, median_stderr: of the stored entries checked.
        zeroth_z: ``both``: max |first - zeroth| / combined stderr, else None.
    """

    max_abs: float
    worst_z: float
    worst_ratio: float
    z: float
    atol: float
    bias: tuple[float, int, int]
    max_stderr: float
    median_stderr: float
    zeroth_z: float | None = None


def reference_rows(problem: Problem, smoothing: Smoothing, rows: np.ndarray, *, chunk: int = 64
                   ) -> dict[str, np.ndarray]:
    """The smoothed rows ``rows`` in one process, by plain autograd at each perturbed point.

    Args:
        problem: the rebuilt problem.
        smoothing: what to estimate (give it another seed for an independent run).
        rows: flat row indices.
        chunk: rows per pass.

    Returns:
        ``{column: (len(rows), n)}`` as :attr:`Smoothing.columns`.
    """
    from pipeline.maths.kinds import maths_of

    reference = maths_of(problem.kind).reference_rows
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)

    def rows_at(point: Tensor, a: int, b: int) -> np.ndarray:
        return np.asarray(reference(dataclasses.replace(problem, x=point), rows[a:b]))

    parts: dict[str, list[np.ndarray]] = {c: [] for c in smoothing.columns}
    for _, cols in smoothed_blocks(problem.fn, problem.x, smoothing, rows_at, 0, len(rows),
                                   chunk=chunk, index=rows):
        for name in parts:
            parts[name].append(cols[name])
    n = problem.x.numel()
    return {k: np.concatenate(v) if v else np.zeros((0, n)) for k, v in parts.items()}


def check_against(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], ad: np.ndarray,
                  rows: np.ndarray, *, rtol: float) -> SmoothedCheck:
    """Compare stored smoothed rows with an independent reference and with plain AD.

    Args:
        got, ref: ``{column: (rows, n)}`` of the stored result and of the reference.
        ad: the plain AD rows at ``x`` (the bias is measured against them).
        rows: the flat row numbers of the checked rows.
        rtol: rounding allowance relative to max |reference|.
    """
    diff = np.abs(got["values"] - ref["values"])
    comb = np.sqrt(got["stderr"] ** 2 + ref["stderr"] ** 2)
    atol = rtol * float(np.abs(ref["values"]).max(initial=0.0)) + 1e-300
    z = agreement_z(diff.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        zs = np.where(comb > 0, diff / comb, np.where(diff <= atol, 0.0, np.inf))
    bias = np.abs(got["values"] - ad)
    at = np.unravel_index(int(np.argmax(bias)), bias.shape) if bias.size else (0, 0)
    zeroth_z = None
    if "zeroth" in got:
        gap = np.abs(got["values"] - got["zeroth"])
        se = np.sqrt(got["stderr"] ** 2 + got["zeroth_stderr"] ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            zeroth_z = float(np.where(se > 0, gap / se, 0.0).max(initial=0.0))
    return SmoothedCheck(
        max_abs=float(diff.max(initial=0.0)),
        worst_z=float(zs.max(initial=0.0)),
        worst_ratio=float((diff / (z * comb + atol)).max(initial=0.0)),
        z=z,
        atol=atol,
        bias=(float(bias.max(initial=0.0)), int(rows[at[0]]) if bias.size else 0, int(at[1])),
        max_stderr=float(got["stderr"].max(initial=0.0)),
        median_stderr=float(np.median(got["stderr"])) if got["stderr"].size else 0.0,
        zeroth_z=zeroth_z,
    )
