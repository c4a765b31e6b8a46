"""Finite-difference cross-checks and kink detection (pipeline/maths/fd.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.contact import build as build_contact
from pipeline.maths.fd import FDReport, fd_check, sample_columns


def _jac(fn, x: torch.Tensor) -> torch.Tensor:
    """The AD reference: a 2-D (m, n) Jacobian."""
    y = fn(x)
    return torch.autograd.functional.jacobian(fn, x).reshape(y.numel(), x.numel())


def _mlp(dtype: torch.dtype, act=torch.tanh, n: int = 12, m: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(32, n, generator=g, dtype=dtype) / n**0.5
    b1 = torch.randn(32, generator=g, dtype=dtype) * 0.1
    w2 = torch.randn(m, 32, generator=g, dtype=dtype) / 32**0.5
    x = torch.randn(n, generator=g, dtype=dtype) * 2.0

    def fn(v: torch.Tensor) -> torch.Tensor:
        return w2 @ act(w1 @ v + b1)

    return fn, x


def test_sample_columns_reproducible_distinct_sorted():
    a = sample_columns(1000, 20, seed=3)
    assert a == sample_columns(1000, 20, seed=3)
    assert a != sample_columns(1000, 20, seed=4)
    assert len(set(a)) == 20 and a == sorted(a) and all(0 <= c < 1000 for c in a)
    assert sample_columns(5, 10) == [0, 1, 2, 3, 4]
    assert sample_columns(0, 3) == []
    with pytest.raises(ValueError, match="n >= 0 and k >= 0"):
        sample_columns(-1, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_smooth_tanh_mlp_no_kinks_and_ad_matches_fd(dtype):
    fn, x = _mlp(dtype)
    report = fd_check(fn, x, _jac(fn, x), range(x.numel()))
    assert report.nonsmooth_inputs == []
    assert report.disagreeing_columns == [] and report.ok
    worst = max(c.rel_err for c in report.checks)
    if dtype == torch.float64:
        # float64 weights: FD in float64, central error ~ eps^(2/3) ~ 4e-11.
        assert report.fd_dtype == "float64"
        assert worst < 1e-8
    else:
        # float32 weights refuse a float64 input: FD falls back to float32.
        assert report.fd_dtype == "float32"
        assert "refused" in report.fd_dtype_reason
        assert worst < 5e-3
    # Steps follow h = eps^(1/3) * max(1, |x_j|) (up to representability).
    eps = np.finfo(report.fd_dtype).eps
    for c in report.checks:
        expected = eps ** (1 / 3) * max(1.0, abs(float(x[c.index])))
        assert c.h == pytest.approx(expected, rel=1e-3)


def test_strong_curvature_is_not_a_kink():
    def fn(v: torch.Tensor) -> torch.Tensor:
        return torch.stack((torch.exp(20 * v[0]), 1e4 * v[1] ** 2, torch.sin(50 * v[2])))

    x = torch.tensor([0.0, 0.0, 0.3], dtype=torch.float64)
    report = fd_check(fn, x, _jac(fn, x), [0, 1, 2])
    assert report.nonsmooth_inputs == []
    assert report.ok


def test_contact_default_state_reports_z_as_nonsmooth():
    problem = build_contact()
    report = fd_check(problem.fn, problem.x, _jac(problem.fn, problem.x), range(6))
    assert report.nonsmooth_inputs == [2]  # z, exactly on the contact switching point
    # AD takes one side of the kink (relu'(0) = 0): consistent, not a mismatch.
    assert report.disagreeing_columns == []
    z = report.checks[2]
    assert z.verdict.startswith("kink")
    # Jump of d vz'/dz across z = 0: dt * (stiffness - damping * vz) / mass.
    assert z.kink_jump == pytest.approx(0.01 * (1e4 + 50.0 * 1.0) / 1.0, rel=1e-6)
    assert z.kink_row == 5  # vz', where the jump is largest
    # ... but the central difference is the average of both sides: half the jump away.
    assert z.abs_err == pytest.approx(z.kink_jump / 2, rel=1e-6)


def test_contact_in_flight_is_smooth_and_float32_job_uses_float64_fd():
    problem = build_contact(z0=0.5, dtype="float32")
    report = fd_check(problem.fn, problem.x, _jac(problem.fn, problem.x), range(6))
    assert report.nonsmooth_inputs == []
    assert report.ok
    assert report.fd_dtype == "float64"
    assert report.fd_dtype_reason == "fn accepted a float64 copy of x"


def test_wrong_ad_column_is_reported():
    fn, x = _mlp(torch.float64)
    jac = _jac(fn, x).clone()
    jac[4, 7] *= 1 + 1e-4
    calls = []

    def columns(cols: np.ndarray) -> np.ndarray:
        calls.append(cols.tolist())
        return jac[:, cols].numpy()

    report = fd_check(fn, x, columns, [3, 7, 9])
    assert calls == [[3, 7, 9]]
    assert report.disagreeing_columns == [7]
    assert report.nonsmooth_inputs == []
    assert not report.ok
    assert report.checks[1].verdict == "MISMATCH"


@pytest.mark.parametrize(("point", "kink"), [(0.0, True), (1.0, False), (-1.0, False)])
def test_relu_kink_at_zero_only(point, kink):
    x = torch.tensor([point], dtype=torch.float64)
    report = fd_check(torch.relu, x, _jac(torch.relu, x), [0])
    assert report.nonsmooth_inputs == ([0] if kink else [])
    assert report.ok
    if kink:
        assert report.checks[0].kink_jump == pytest.approx(1.0, rel=1e-9)


def test_wrong_derivative_at_a_kink_is_still_a_mismatch():
    x = torch.tensor([0.0], dtype=torch.float64)
    report = fd_check(torch.relu, x, np.array([[2.0]]), [0])  # outside [0, 1]
    assert report.nonsmooth_inputs == [0]
    assert report.disagreeing_columns == [0]


def test_numpy_function_and_c1_function():
    x = np.array([0.0, 2.0, -3.0])
    report = fd_check(np.abs, x, np.diag(np.sign(x)), [0, 1, 2])
    assert report.nonsmooth_inputs == [0]
    assert report.ok
    # x|x| is C^1 at 0 (derivative 0) although not C^2: not a kink, AD = 0 agrees.
    report = fd_check(lambda v: v * np.abs(v), np.zeros(1), np.zeros((1, 1)), [0])
    assert report.nonsmooth_inputs == [] and report.ok


def test_report_json_and_rows():
    problem = build_contact()
    report = fd_check(problem.fn, problem.x, _jac(problem.fn, problem.x), [1, 2])
    data = json.loads(report.dumps())
    assert data["nonsmooth_inputs"] == [2]
    assert data["shape"] == [6, 6]
    assert [c["index"] for c in data["checks"]] == [1, 2]
    rows = report.rows()
    assert len(rows) == 2 and all(len(r) == len(FDReport.HEADER) for r in rows)
    assert all(isinstance(v, str) for r in rows for v in r)


def test_a_kink_row_never_says_ad_equals_fd():
    """``AD≈FD yes`` used to sit beside a relative error of 1.00 on the kink row."""
    problem = build_contact()
    report = fd_check(problem.fn, problem.x, _jac(problem.fn, problem.x), [1, 2])
    col = FDReport.HEADER.index("AD≈FD")
    smooth, kink = report.rows()
    assert smooth[col] == "yes" and smooth[-1] == "ok"
    assert report.checks[1].kink and report.checks[1].rel_err > 0.1
    assert kink[col] == "kink (one-sided)", kink


def test_bad_arguments():
    fn, x = _mlp(torch.float64)
    jac = _jac(fn, x)
    with pytest.raises(ValueError, match="out of range"):
        fd_check(fn, x, jac, [12])
    with pytest.raises(ValueError, match="full Jacobian"):
        fd_check(fn, x, jac[:, :3], [0])
    with pytest.raises(ValueError, match="returned shape"):
        fd_check(fn, x, lambda cols: jac[:, :1].numpy(), [0, 1])
