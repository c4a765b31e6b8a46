"""Streamed randomized SVD (pipeline/analysis/svd.py) against numpy.linalg.svd."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.analysis.svd import streamed_svd


def _matrix(m: int, n: int, s: np.ndarray, seed: int = 0) -> np.ndarray:
    """``U diag(s) V^T`` with random orthonormal ``U`` (m x r) and ``V`` (n x r)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (u * s) @ v.T


class Blocks:
    """Uneven row blocks of ``a`` (including empty ones); counts the passes."""

    def __init__(self, a: np.ndarray, sizes=(7, 0, 41, 13)):
        self.a, self.sizes, self.calls, self.largest = a, sizes, 0, 0

    def __call__(self):
        self.calls += 1
        i = j = 0
        while i < self.a.shape[0]:
            r = self.sizes[j % len(self.sizes)]
            j += 1
            block = self.a[i : i + r]
            self.largest = max(self.largest, block.shape[0])
            yield block
            i += r


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / want))


def test_exact_rank_recovers_values_and_vectors():
    a = _matrix(300, 200, np.linspace(10.0, 1.0, 8))
    blocks = Blocks(a)
    res = streamed_svd(blocks, 200, 8, oversample=5, power_iters=1)
    want = np.linalg.svd(a, compute_uv=False)[:8]
    assert _rel_err(res.s, want) < 1e-12
    assert np.linalg.norm(a - (res.u * res.s) @ res.vt) < 1e-11 * np.linalg.norm(a)
    assert np.allclose(res.u.T @ res.u, np.eye(8), atol=1e-12)
    # 2 + 2 * power_iters passes, never more than one block held at a time.
    assert res.passes == blocks.calls == 4
    assert blocks.largest == 41
    assert (res.m, res.n) == (300, 200)


def test_fast_decay_is_exact_to_rounding():
    a = _matrix(300, 200, 0.7 ** np.arange(200))
    res = streamed_svd(Blocks(a), 200, 10)
    assert _rel_err(res.s, np.linalg.svd(a, compute_uv=False)[:10]) < 1e-10


def test_slow_decay_improves_with_power_iterations():
    a = _matrix(300, 200, 1.0 / np.arange(1, 201))
    want = np.linalg.svd(a, compute_uv=False)[:10]
    errs = [_rel_err(streamed_svd(Blocks(a), 200, 10, power_iters=q).s, want) for q in (0, 2, 4)]
    # Measured 0.21, 5.1e-4, 3.7e-7 (seed 0); bounds with a ~10x margin.
    assert errs[1] < 5e-3
    assert errs[2] < 4e-6
    assert errs[0] > errs[1] > errs[2]
    # Randomized SVD never overestimates: ||B|| <= ||A|| singular value by value.
    res = streamed_svd(Blocks(a), 200, 10, power_iters=0)
    assert np.all(res.s <= want * (1 + 1e-12))


def test_full_spectrum_gives_condition_number():
    a = _matrix(120, 80, np.logspace(0, -6, 80), seed=1)
    res = streamed_svd(Blocks(a), 80, 80)
    assert len(res.s) == 80
    assert res.condition_estimate == pytest.approx(np.linalg.cond(a), rel=1e-9)
    assert "all 80" in res.note
    # Wide matrix: min(m, n) = m values.
    b = _matrix(30, 80, np.logspace(0, -3, 30), seed=2)
    res = streamed_svd(Blocks(b), 80, 50)
    assert len(res.s) == 30 and res.u.shape == (30, 30) and res.vt.shape == (30, 80)
    assert res.condition_estimate == pytest.approx(1e3, rel=1e-8)


def test_partial_spectrum_has_no_condition_number():
    a = _matrix(120, 80, np.logspace(0, -6, 80), seed=1)
    res = streamed_svd(Blocks(a), 80, 5)
    assert res.condition_estimate is None
    assert "lower bound" in res.note
    data = json.loads(json.dumps(res.to_json()))
    assert data["condition_estimate"] is None and len(data["singular_values"]) == 5


def test_singular_matrix_and_float32_blocks():
    a = _matrix(40, 30, np.array([3.0, 2.0, 1.0]))  # rank 3 < 30
    res = streamed_svd(Blocks(a.astype(np.float32)), 30, 30)
    want = np.linalg.svd(a.astype(np.float32).astype(np.float64), compute_uv=False)
    assert _rel_err(res.s[:3], want[:3]) < 1e-10
    # All 30 values computed; 27 of them are rounding noise, so s_max / s_min is huge.
    assert res.condition_estimate is not None and res.condition_estimate > 1e6


def test_bad_inputs():
    a = np.ones((10, 4))
    with pytest.raises(ValueError, match="expected n >= 1, k >= 1"):
        streamed_svd(Blocks(a), 4, 0)
    with pytest.raises(ValueError, match=r"expected \(rows, n=5\)"):
        streamed_svd(Blocks(a), 5, 2)
    with pytest.raises(ValueError, match="empty"):
        streamed_svd(lambda: iter([]), 4, 2)

    state = {"calls": 0}

    def shrinking():
        state["calls"] += 1
        return iter([a[: 10 - state["calls"]]])

    with pytest.raises(ValueError, match="same matrix every call"):
        streamed_svd(shrinking, 4, 2)
