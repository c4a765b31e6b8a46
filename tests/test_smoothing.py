"""Randomized smoothing (issue 17): the estimators, their error bars, the sharded run, the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian
from typer.testing import CliRunner

from pipeline.analysis.smoothing import read_column
from pipeline.cli import app
from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions
from pipeline.core.smoothing import ESTIMATORS, Smoothing, parse_smooth
from pipeline.maths.smoothing import agreement_z, direction, smoothed_blocks

MLP = ["n=6", "m=5", "hidden=8", "activation=relu", "dtype=float64"]
#: Large enough that the relu units switch between samples (a non-zero stderr everywhere).
SIGMA = 1.0


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


def test_sigma_auto_and_per_input_file(tmp_path):
    x = torch.tensor([0.5, -300.0, 2.0], dtype=torch.float64)
    auto = parse_smooth("auto")
    np.testing.assert_allclose(auto.sigma_vector(x), [0.01, 3.0, 0.02])
    path = tmp_path / "sigma.npy"
    np.save(path, np.array([0.1, 0.2, 0.3]))
    vec = parse_smooth(str(path))
    np.testing.assert_allclose(vec.sigma_vector(x), [0.1, 0.2, 0.3])
    assert Smoothing.from_json(vec.to_json()) == vec
    with pytest.raises(JacpipeError, match="3 sigmas for 2 inputs"):
        vec.sigma_vector(x[:2])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"smooth": "-1"}, "positive"),
    ({"smooth": "wide"}, "positive number, auto, or a .npy"),
    ({"smooth": "0.1", "samples": 7}, "even number >= 4"),
    ({"smooth": "0.1", "samples": 2}, "even number >= 4"),
    ({"smooth": "0.1", "estimator": "second"}, "first, zeroth or both"),
    ({"smooth": "missing.npy"}, "cannot read"),
    ({"smooth": "0.1", "method": "sparse"}, "dense rows"),
])
def test_bad_smoothing_options_are_one_line(kwargs, message):
    with pytest.raises(JacpipeError, match=message):
        RunOptions(job="contact", **kwargs).check()


def test_hessian_jobs_are_refused():
    from pipeline.runner.job import check_job

    with pytest.raises(JacpipeError, match="jacobian kind only"):
        check_job(RunOptions(job="rosenbrock", params=["n=4"], smooth="0.1"))


# ---------------------------------------------------------------------------
# Sharded runs on Ray
# ---------------------------------------------------------------------------


def _run(out, *, shards, sigma=SIGMA, samples=16, estimator="first", chunk=None, seed=0):
    from pipeline.runner.driver import run

    return run(RunOptions(job="mlp", params=list(MLP), out=str(out), shards=shards,
                          chunk_size=chunk, smooth=sigma, samples=samples, estimator=estimator,
                          smooth_seed=seed, progress=False), echo=lambda s: None)


def _stored(out, column="values"):
    from pipeline.store.reader import open_jacobian

    result = open_jacobian(str(out))
    if column == "values":
        return result.read(as_="numpy")
    return read_column(result, column)


def test_stderr_column_is_the_standard_error_of_the_pair_means(ray_session, tmp_path):
    from pipeline.problem.problem import build_problem, parse_params, resolve_builder

    summary = _run(tmp_path / "s", shards=2, estimator="both")
    facts = summary.manifest.to_json()["smoothing"]
    assert (facts["sigma"], facts["samples"], facts["seed"], facts["estimator"]) == (
        SIGMA, 16, 0, "both")
    problem = build_problem("mlp", parse_params(resolve_builder("mlp"), MLP))
    x, n = problem.x, problem.x.numel()
    first, zeroth = [], []
    for p in range(8):  # brute force: one pair at a time, all of J
        s = torch.as_tensor(SIGMA * direction(0, p, n))
        first.append((jacobian(problem.fn, x + s) + jacobian(problem.fn, x - s)).numpy() / 2)
        d = (problem.fn(x + s) - problem.fn(x - s)).detach().numpy()
        zeroth.append(np.outer(d, direction(0, p, n) / SIGMA) / 2)
    assert np.stack(first).std(0).min() > 0  # the check below is not vacuous
    for samples, values, stderr in ((first, "values", "stderr"),
                                    (zeroth, "zeroth", "zeroth_stderr")):
        stack = np.stack(samples)
        np.testing.assert_allclose(_stored(tmp_path / "s", values), stack.mean(0), atol=1e-12)
        np.testing.assert_allclose(_stored(tmp_path / "s", stderr),
                                   stack.std(0, ddof=1) / np.sqrt(8), atol=1e-12)


def test_same_seed_same_result_whatever_the_shards(ray_session, tmp_path):
    _run(tmp_path / "one", shards=1)
    _run(tmp_path / "five", shards=5, chunk=1)
    for column in ("values", "stderr"):
        np.testing.assert_allclose(_stored(tmp_path / "one", column),
                                   _stored(tmp_path / "five", column), rtol=1e-12, atol=1e-14)
    _run(tmp_path / "other", shards=1, seed=1)
    assert not np.allclose(_stored(tmp_path / "one", "stderr"),
                           _stored(tmp_path / "other", "stderr"))


def test_resume_keeps_shards_and_refuses_another_sigma(ray_session, tmp_path):
    first = _run(tmp_path / "r", shards=3)
    again = _run(tmp_path / "r", shards=3)
    assert (again.computed, again.skipped) == (0, 3)
    assert again.manifest.smoothing == first.manifest.smoothing
    with pytest.raises(JacpipeError, match="differs in: smoothing"):
        _run(tmp_path / "r", shards=3, sigma=2 * SIGMA)


def test_cli_contact_end_to_end(ray_session, tmp_path):
    runner = CliRunner()
    plain, smooth = str(tmp_path / "plain"), str(tmp_path / "smooth")
    res = runner.invoke(app, ["run", "contact", "--out", plain, "--shards", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["compare", plain, "--fd"])
    assert res.exit_code == 0, res.output
    assert "--smooth 0.01 --samples 256" in " ".join(res.output.split())
    res = runner.invoke(app, ["run", "contact", "--smooth", "0.01", "--samples", "64",
                              "--shards", "2", "--out", smooth])
    assert res.exit_code == 0 and "smoothed: sigma 0.01, K=64" in res.output, res.output
    res = runner.invoke(app, ["compare", smooth, "--json"])
    assert res.exit_code == 0, res.output
    assert "bias vs plain AD" in res.output and "50.25 at J[5, 2]" in res.output
    res = runner.invoke(app, ["inspect", smooth])
    assert res.exit_code == 0 and "J[5, 2] = -50.25 ±" in res.output, res.output
    # the kink's derivative: -(k - c vz) dt / m * Phi(0) on vz', exact for every pair
    values, stderr = _stored(smooth), _stored(smooth, "stderr")
    assert abs(values[5, 2] + 50.25) <= 3 * stderr[5, 2] + 0.05


def test_readme_smoothing_commands_run(ray_session, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Non-smooth functions"):]
    section = section[:section.index("\n## ", 5)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line in "".join(blocks).splitlines():
        for part in line.split("#")[0].split("&&"):
            if part.strip():
                argv = shlex.split(part.strip())
                assert argv[0] == "jacpipe"
                res = CliRunner().invoke(app, argv[1:], catch_exceptions=False)
                assert res.exit_code == 0, (argv, res.output)
                ran += 1
    assert ran >= 3
