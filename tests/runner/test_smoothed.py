"""``pipeline.runner.smoothed``: smoothed runs, sharded on Ray and through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian
from typer.testing import CliRunner

from pipeline.analysis.smoothing import read_column
from pipeline.cli import app
from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions
from pipeline.maths.smoothing import direction

MLP = ["n=6", "m=5", "hidden=8", "activation=relu", "dtype=float64"]


#: Large enough that the relu units switch between samples (a non-zero stderr everywhere).
SIGMA = 1.0


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
