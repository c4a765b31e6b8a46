"""Top singular values of a matrix read as a stream of row blocks.

Randomized range finding (Halko, Martinsson & Tropp 2011, Algorithms 4.4 and
5.1) adapted to a matrix that is only ever seen one block of rows at a time,
e.g. a Jacobian read back shard by shard from Parquet. Each pass over the
blocks touches every entry once; the full matrix is never materialised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SVDResult:
    """Top singular triplets of an ``m x n`` matrix ``A ~ u @ diag(s) @ vt``.

    Attributes:
        s: the top ``k`` singular values, descending (``min(k, m, n)`` of them).
        u: ``(m, len(s))`` left singular vectors.
        vt: ``(len(s), n)`` right singular vectors.
        m: rows of ``A``.
        n: columns of ``A``.
        passes: how many times the blocks were read.
        condition_estimate: ``s_max / s_min`` when all ``min(m, n)`` singular
            values were computed (``inf`` for a singular matrix), else ``None``.
        note: a sentence on how to read ``condition_estimate``.
    """

    s: np.ndarray
    u: np.ndarray
    vt: np.ndarray
    m: int
    n: int
    passes: int
    condition_estimate: float | None
    note: str

    def to_json(self) -> dict[str, Any]:
        """The singular values and facts, JSON-ready (no vectors)."""
        cond = self.condition_estimate
        return {
            "m": self.m,
            "n": self.n,
            "singular_values": [float(v) for v in self.s],
            "passes": self.passes,
            "condition_estimate": None if cond is None or not np.isfinite(cond) else cond,
            "singular": cond is not None and not np.isfinite(cond),
            "note": self.note,
        }


def streamed_svd(
    blocks: Callable[[], Iterable[np.ndarray]],
    n: int,
    k: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> SVDResult:
    """Top-``k`` SVD of the ``m x n`` matrix ``A`` given as consecutive row blocks.

    With ``l = k + oversample`` (capped at ``n``) and a Gaussian ``n x l`` test
    matrix ``Omega``:

    1. ``Y = A @ Omega`` block by block, ``Q = qr(Y)``;
    2. ``power_iters`` times: ``Z = qr(A.T @ Q)`` and ``Q = qr(A @ Z)``, each
       product one streamed pass (``A.T @ Q = sum_i A_i.T @ Q_i``);
    3. ``B = Q.T @ A`` streamed, then the SVD of the small ``l x n`` ``B``.

    That is ``2 + 2 * power_iters`` passes over the blocks. Memory is
    ``O((m + n)(k + p))`` (``Y``/``Q``: ``m x l``, ``Omega``/``Z``/``B``:
    ``n x l``) plus one block; ``A`` itself is never held. Arithmetic is in
    float64 whatever the blocks' dtype.

    When ``l >= min(m, n)`` the range of ``A`` is captured exactly (up to
    rounding), so the result is the exact SVD; otherwise the error of the
    ``j``-th value decays like ``(s_{l+1} / s_j)^(2 q + 1)``.

    Args:
        blocks: returns a fresh iterator over the row blocks of ``A`` in row
            order, each an array ``(r_i, n)``; it is called once per pass.
        n: number of columns of ``A``.
        k: number of singular values wanted.
        oversample: extra columns ``p`` of the test matrix.
        power_iters: power (subspace) iterations ``q``; more help slowly
            decaying spectra.
        seed: seed of the test matrix.

    Returns:
        An :class:`SVDResult` with ``min(k, m, n)`` singular values.

    Raises:
        ValueError: bad ``n``/``k``/``oversample``/``power_iters``, a block
            that is not ``(r, n)``, an empty matrix, or ``blocks()`` giving a
            different number of rows on a later pass.
    """
    _check_args(n, k, oversample, power_iters)
    return _range_svd(
        lambda right, m: _times(blocks, right, n, m),
        lambda left, m: _transpose_times(blocks, left, n, m),
        n, k, oversample=oversample, power_iters=power_iters, seed=seed,
    )


def operator_svd(
    op: Any, k: int, *, oversample: int = 10, power_iters: int = 2, seed: int = 0
) -> SVDResult:
    """Top-``k`` SVD of a linear operator by the same algorithm as :func:`streamed_svd`.

    Each pass is one ``op.matmat`` or ``op.rmatmat`` (for a result folder,
    ``JacobianResult.as_linear_operator(dtype="float64")``: one streamed read
    of the parts, dense or sparse).

    Args:
        op: anything with ``shape``, ``matmat`` and ``rmatmat``
            (a ``scipy.sparse.linalg.LinearOperator``).
        k, oversample, power_iters, seed: as :func:`streamed_svd`.

    Returns:
        An :class:`SVDResult` with ``min(k, m, n)`` singular values.

    Raises:
        ValueError: bad ``k``/``oversample``/``power_iters`` or an empty operator.
    """
    m, n = op.shape
    _check_args(n, k, oversample, power_iters)
    return _range_svd(
        lambda right, _m: np.asarray(op.matmat(right), dtype=np.float64),
        lambda left, _m: np.asarray(op.rmatmat(left), dtype=np.float64),
        n, k, oversample=oversample, power_iters=power_iters, seed=seed,
    )


def _check_args(n: int, k: int, oversample: int, power_iters: int) -> None:
    if n < 1 or k < 1 or oversample < 0 or power_iters < 0:
        raise ValueError(
            "streamed_svd: expected n >= 1, k >= 1, oversample >= 0, power_iters >= 0; "
            f"got n={n}, k={k}, oversample={oversample}, power_iters={power_iters}"
        )


def _range_svd(
    times: Callable[[np.ndarray, int | None], np.ndarray],
    transpose_times: Callable[[np.ndarray, int], np.ndarray],
    n: int,
    k: int,
    *,
    oversample: int,
    power_iters: int,
    seed: int,
) -> SVDResult:
    """Randomized range finding given ``A @ X`` and ``A.T @ Y`` (one pass each)."""
    rng = np.random.default_rng(seed)
    l = min(k + oversample, n)  # noqa: E741 (the l of Halko et al.)
    omega = rng.standard_normal((n, l))

    passes = 1
    y = times(omega, None)
    m = y.shape[0]
    if m == 0:
        raise ValueError("streamed_svd: blocks() yielded no rows; the matrix is empty")
    q = _orth(y)
    for _ in range(power_iters):
        z = _orth(transpose_times(q, m))
        q = _orth(times(z, m))
        passes += 2
    b = transpose_times(q, m).T  # B = Q^T A, (l', n)
    passes += 1

    u_b, s, vt = np.linalg.svd(b, full_matrices=False)
    r = min(k, m, n)
    s, u, vt = s[:r], q @ u_b[:, :r], vt[:r]

    full = min(m, n)
    if k >= full:
        cond = float(s[0] / s[-1]) if s[-1] > 0 else float("inf")
        note = f"all {full} singular values computed: condition_estimate = s_max / s_min"
    else:
        cond = None
        lower = f"{s[0] / s[-1]:.3g}" if s[-1] > 0 else "inf"
        note = (
            f"only the top {r} of {full} singular values computed (k < min(m, n)), so the "
            f"condition number is unknown; s_max / s_{r} = {lower} is a lower bound of it"
        )
    return SVDResult(s=s, u=u, vt=vt, m=m, n=n, passes=passes, condition_estimate=cond, note=note)


def _blocks_checked(
    blocks: Callable[[], Iterable[np.ndarray]], n: int
) -> Iterable[tuple[int, np.ndarray]]:
    """Yield ``(start_row, float64 block)`` with shape checks."""
    start = 0
    for i, block in enumerate(blocks()):
        a = np.asarray(block, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != n:
            raise ValueError(f"streamed_svd: block {i} has shape {a.shape}, expected (rows, n={n})")
        yield start, a
        start += a.shape[0]


def _times(
    blocks: Callable[[], Iterable[np.ndarray]], right: np.ndarray, n: int, m: int | None
) -> np.ndarray:
    """``A @ right`` in one pass; ``m`` (if known) is checked against the rows seen."""
    parts = [a @ right for _, a in _blocks_checked(blocks, n)]
    out = np.concatenate(parts, axis=0) if parts else np.zeros((0, right.shape[1]))
    _check_rows(m, out.shape[0])
    return out


def _transpose_times(
    blocks: Callable[[], Iterable[np.ndarray]], left: np.ndarray, n: int, m: int
) -> np.ndarray:
    """``A.T @ left`` in one pass, accumulating ``A_i.T @ left_i``."""
    out = np.zeros((n, left.shape[1]))
    stop = 0
    for start, a in _blocks_checked(blocks, n):
        stop = start + a.shape[0]
        if stop > m:
            break
        out += a.T @ left[start:stop]
    _check_rows(m, stop)
    return out


def _check_rows(expected: int | None, got: int) -> None:
    if expected is not None and got != expected:
        raise ValueError(
            f"streamed_svd: blocks() gave {got} rows on a later pass but {expected} on the "
            "first; it must return a fresh iterator over the same matrix every call"
        )


def _orth(a: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of ``a`` (reduced QR)."""
    q, _ = np.linalg.qr(a)
    return q
