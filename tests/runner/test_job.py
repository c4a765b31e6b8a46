"""``pipeline.runner.job``: checks of a job before it runs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions


def test_hessian_jobs_are_refused():
    from pipeline.runner.job import check_job

    with pytest.raises(JacpipeError, match="jacobian kind only"):
        check_job(RunOptions(job="rosenbrock", params=["n=4"], smooth="0.1"))


def test_a_backward_that_raises_for_some_rows_is_one_line_from_the_driver_probe(tmp_path):
    from pipeline.cli import app
    from pipeline.runner.job import check_job
    from tests.clitools import error_line

    spec = "tests.userjobs:backward_raises_for_some_rows"
    with pytest.raises(JacpipeError) as caught:
        check_job(RunOptions(job=spec))
    message = str(caught.value)
    assert caught.value.exit_code == 1
    assert message.startswith(f"job {spec!r}: fn(x) or its backward raised ValueError: "
                              "no derivative for row 0 [File ")
    assert "userjobs.py" in message and "in backward]" in message
    out = str(tmp_path / "o")
    result = CliRunner().invoke(app, ["run", spec, "--executor", "local", "--out", out])
    line = error_line(result)
    assert result.exit_code == 1
    assert "fn(x) or its backward raised ValueError" in line and "JACPIPE_DEBUG" not in line


def test_a_random_op_is_refused_before_any_shard(tmp_path):
    """Random windows: two calls often agree, so the fingerprint alone let it pass 4 in 9."""
    import pipeline
    from pipeline.cli import app
    from tests.clitools import error_line
    from tests.userjobs import random_windows

    for _ in range(3):  # the same answer on every call, whatever the draws
        with pytest.raises(JacpipeError, match=r"fn uses a random op \(aten\.rand\.default\)"):
            pipeline.run(random_windows(), out=str(tmp_path / "o"), executor="local")
    assert not (tmp_path / "o").exists()
    spec = "tests.userjobs:random_windows"
    result = CliRunner().invoke(app, ["run", spec, "--executor", "local", "--out",
                                      str(tmp_path / "c")])
    assert result.exit_code == 2
    assert error_line(result).startswith(f"error: {spec}: fn uses a random op "
                                         "(aten.rand.default) whose draws change")
