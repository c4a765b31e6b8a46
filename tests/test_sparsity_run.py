"""Automatic sparsity detection end to end (issue 12): --sparsity auto through Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import read_jacobian
from pipeline.cli import app
from tests.manifests import read_doc

cli = CliRunner()


def _run(*args: object):
    return cli.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("job,params", [
    ("heat", ["N=12"]),
    ("brusselator", ["N=6"]),
    ("banded", ["n=300", "k=2"]),
    ("rosenbrock", ["n=200"]),
    ("trajectory", ["waypoints=20"]),
])
def test_sparsity_auto_equals_the_hand_pattern_run(ray_session, tmp_path, job, params):
    p = [a for kv in params for a in ("-p", kv)]
    hand = _run("run", job, *p, "-p", "pattern=true", "--out", tmp_path / "hand",
                "--no-progress")
    assert hand.exit_code == 0, hand.output
    auto = _run("run", job, *p, "-p", "pattern=false", "--sparsity", "auto", "--out",
                tmp_path / "auto", "--no-progress")
    assert auto.exit_code == 0, auto.output
    assert "note: sparsity detected in" in auto.output
    man_hand = read_doc(tmp_path / "hand")
    man_auto = read_doc(tmp_path / "auto")
    assert man_auto["layout"] == "sparse" and man_auto["coloring"]["source"] == "detected"
    assert man_hand["coloring"]["source"] == "job"
    # exactly the hand pattern, hence the same colouring and values
    assert man_auto["coloring"]["pattern_sha256"] == man_hand["coloring"]["pattern_sha256"]
    assert man_auto["sparsity_detection"]["seconds"] > 0
    a = read_jacobian(tmp_path / "auto").toarray()
    h = read_jacobian(tmp_path / "hand").toarray()
    np.testing.assert_allclose(a, h, rtol=1e-12, atol=1e-12)
    info = json.loads(_run("inspect", tmp_path / "auto", "--json").output)
    assert info["pattern_source"] == "detected"


def test_method_auto_detects_a_pattern_by_itself_and_gives_up_on_dense_jobs(ray_session,
                                                                            tmp_path):
    sparse = _run("run", "heat", "-p", "N=16", "-p", "pattern=false", "--out", tmp_path / "h",
                  "--no-progress", "--verify")
    assert sparse.exit_code == 0, sparse.output
    assert "sparsity detected" in sparse.output and "MATCH" in sparse.output
    assert read_doc(tmp_path / "h")["layout"] == "sparse"
    dense = _run("run", "mlp", "-p", "n=60", "-p", "m=50", "--out", tmp_path / "m",
                 "--no-progress")
    assert dense.exit_code == 0, dense.output
    man = read_doc(tmp_path / "m")
    assert man["layout"] == "dense" and man["sparsity_detection"]["source"] == "detected"
    assert "sparsity detection gave up" in man["sparsity_detection"]["note"]


def test_explicit_detection_refusals_are_one_line(ray_session, tmp_path):
    result = _run("run", "tests.userjobs:branchy", "--sparsity", "auto", "--out", tmp_path / "o")
    assert result.exit_code == 2
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--sparsity auto" in errors[0] and "local" in errors[0]
    local = _run("run", "tests.userjobs:branchy", "--sparsity", "auto-local", "--out",
                 tmp_path / "l", "--no-progress", "--verify")
    assert local.exit_code == 0, local.output
    assert "holds at this x only" in local.output and "MATCH" in local.output
