"""``pipeline.maths.smoothing``: Gaussian-smoothed derivatives."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from pipeline.core.smoothing import ESTIMATORS, parse_smooth
from pipeline.maths.smoothing import agreement_z, direction, smoothed_blocks


def _rows_by_autograd(f):
    def rows_at(point, a, b):
        return jacobian(f, point).reshape(-1, point.numel())[a:b].numpy()

    return rows_at


def _smoothed(f, x, smoothing, chunk=3):
    m = f(x).numel()
    blocks = list(smoothed_blocks(f, x, smoothing, _rows_by_autograd(f), 0, m, chunk=chunk))
    return {k: np.concatenate([c[k] for _, c in blocks]) for k in smoothing.columns}


@pytest.mark.parametrize("sigma", [0.3, 2.0])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_linear_function_smoothed_is_the_exact_jacobian(sigma, estimator):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    x = torch.randn(5, generator=g, dtype=torch.float64)
    got = _smoothed(lambda t: a @ t + b, x, parse_smooth(sigma, samples=200, estimator=estimator))
    exact = a.numpy()
    if estimator in ("first", "both"):
        # first order: J is constant, so every sample is exact and the error bar is 0
        np.testing.assert_allclose(got["values"], exact, rtol=0, atol=1e-12)
        assert got["stderr"].max() < 1e-12
    zeroth = got["zeroth" if estimator == "both" else "values"]
    se = got["zeroth_stderr" if estimator == "both" else "stderr"]
    if estimator != "first":
        # zeroth order: unbiased, not exact (A w w^T); within its error bars
        assert (np.abs(zeroth - exact) <= agreement_z(exact.size) * se).all()
        assert se.min() > 0


def test_relu_at_its_kink_first_order_is_phi_zero():
    x = torch.zeros(1, dtype=torch.float64)
    got = _smoothed(torch.relu, x, parse_smooth(0.1, samples=64))
    assert abs(got["values"][0, 0] - 0.5) <= 3 * got["stderr"][0, 0] + 1e-12


@pytest.mark.parametrize("estimator", ["first", "zeroth"])
def test_relu_near_its_kink_is_phi_of_x_over_sigma(estimator):
    sigma, shift = 0.1, 0.05  # d/dx E[relu(x + sigma w)] = Phi(x / sigma)
    x = torch.full((1,), shift, dtype=torch.float64)
    got = _smoothed(torch.relu, x, parse_smooth(sigma, samples=2000, estimator=estimator))
    expected = NormalDist().cdf(shift / sigma)
    # 4 standard errors: seed 0 happens to land 3.2 away for the first order
    # (1000 pairs; seeds 1-4 land within 2)
    assert abs(got["values"][0, 0] - expected) <= agreement_z(1) * got["stderr"][0, 0]
    assert got["stderr"][0, 0] < 0.05


def test_directions_depend_on_seed_and_pair_only():
    assert np.array_equal(direction(3, 7, 5), direction(3, 7, 5))
    assert not np.array_equal(direction(3, 7, 5), direction(3, 8, 5))
    assert not np.array_equal(direction(3, 7, 5), direction(4, 7, 5))
