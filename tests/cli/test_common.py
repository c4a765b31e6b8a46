"""``pipeline.cli.common``: every user error is one ``error:`` line and a non-zero exit."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.sparse.compressed import banded_pattern
from tests.clitools import error_line
from tests.clitools import error_line as _one_error
from tests.faultruns import invoke

cli = CliRunner()


def _run(*args: object):
    return cli.invoke(app, [str(a) for a in args])


def test_job_modules_that_fail_to_import_exit_2_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_syntax_job.py").write_text("def build(:\n")
    (tmp_path / "raising_job.py").write_text("raise RuntimeError('no licence server')\n")
    result = _run("run", "broken_syntax_job:build", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "syntax error" in _one_error(result)
    result = _run("run", "raising_job:build", "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert "raised RuntimeError: no licence server" in _one_error(result)


SMALL = ["-p", "n=20", "-p", "m=10", "-p", "hidden=4"]


BAD_INPUTS = {
    "not-a-problem": (["tests.userjobs:not_a_problem"], "build() must return pipeline.Problem"),
    "module-not-importable": (["no_such_module_xyz:build"],
                              "cannot import module 'no_such_module_xyz'"),
    "no-such-function": (["tests.userjobs:nope"], "has no function 'nope'"),
    "value-refused-by-job": (["mlp", "-p", "n=0"], "parameter 'n' must be at least 1, got 0"),
    "build-raises": (["tests.faultjobs:nonfinite", "-p", "m=100"],
                     "build() raised ValueError: nonfinite needs m <= n"),
    "dtype-without-parameter": (["tests.userjobs:raises_in_shard", "--dtype", "float32"],
                                "has no dtype parameter"),
    "device-unknown": (["mlp", *SMALL, "--device", "tpu"], "--device must be auto, cpu or cuda"),
    "num-cpus-0": (["mlp", *SMALL, "--num-cpus", "0"], "--num-cpus must be at least 1"),
    "rows-per-shard-0": (["mlp", *SMALL, "--rows-per-shard", "0"],
                         "--rows-per-shard must be at least 1, got 0"),
    "shards-and-rows-per-shard": (["mlp", *SMALL, "--shards", "2", "--rows-per-shard", "3"],
                                  "give --shards or --rows-per-shard, not both"),
    "cpus-per-shard-too-many": (["mlp", *SMALL, "--cpus-per-shard", "64"],
                                "--cpus-per-shard 64: the cluster has 2 CPUs"),
    "gpus-per-shard-too-many": (["mlp", *SMALL, "--gpus-per-shard", "1"],
                                "--gpus-per-shard 1: the cluster has 0 GPUs"),
    "memory-budget-too-small": (["mlp", *SMALL, "--memory-budget", "1KiB"],
                                "--memory-budget 1.0 KiB is too small"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_one_line_and_non_zero(ray_session, tmp_path, case):
    args, match = BAD_INPUTS[case]
    result = invoke("run", *args, "--out", tmp_path / "o", "--no-progress")
    assert match in error_line(result)
    assert result.exit_code == 2
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("part-*"))


def test_out_that_cannot_be_created_is_one_line(ray_session, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = invoke("run", "mlp", *SMALL, "--out", tmp_path / "file" / "sub")
    assert "cannot create the folder" in error_line(result) and result.exit_code == 2


def test_missing_job_argument_is_a_usage_error():
    result = invoke("run")
    assert result.exit_code == 2 and "Missing argument 'JOB'" in result.output


runner = CliRunner()


@pytest.mark.parametrize("args,match", [
    (["run", "mlp", "-p", "n=20", "-p", "m=20", "--method", "sparse"], "no sparsity pattern"),
    (["run", "banded", "--sparsity", "missing.npz"], "no such file"),
    (["run", "banded", "-p", "n=50", "--sparsity", "__shape__"], "expected (50, 50)"),
])
def test_sparse_user_errors(ray_session, tmp_path, args, match):
    if "__shape__" in args:
        sp.save_npz(tmp_path / "wrong.npz", banded_pattern(60, 3).astype(np.float64))
        args = [str(tmp_path / "wrong.npz") if a == "__shape__" else a for a in args]
    result = invoke(*args, "--out", tmp_path / "o")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert match in result.output


@pytest.mark.parametrize("command,usage", [
    ("run", "jacpipe run [OPTIONS] JOB"),
    ("submit", "jacpipe submit [OPTIONS] JOB"),
    ("compare", "jacpipe compare [OPTIONS] OUT"),
    ("inspect", "jacpipe inspect [OPTIONS] OUT"),
    ("export", "jacpipe export [OPTIONS] OUT FILE"),
    ("status", "jacpipe status [OPTIONS] ID"),
    ("logs", "jacpipe logs [OPTIONS] ID"),
    ("stop", "jacpipe stop [OPTIONS] ID"),
])
def test_usage_lines_name_arguments_by_their_metavar(command, usage):
    """Typer writes a required argument as ``{name}`` (``{JOB}``, ``{out}``, ``{sid}``)."""
    result = CliRunner().invoke(app, [command, "--help"], prog_name="jacpipe",
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "Usage:" in x)
    assert line.split("Usage: ", 1)[1].strip() == usage
    assert "{" not in result.output.split("Options")[0]


def test_usage_name_brackets_only_optional_arguments():
    from types import SimpleNamespace

    from pipeline.cli.common import usage_name

    def arg(**kw):
        return SimpleNamespace(**{"metavar": None, "name": "out", "nargs": 1,
                                  "required": True, **kw})

    assert usage_name(arg()) == "OUT"
    assert usage_name(arg(metavar="ID")) == "ID"
    assert usage_name(arg(required=False)) == "[OUT]"
    assert usage_name(arg(nargs=-1, required=False)) == "[OUT...]"


def complete(words: str, cword: int) -> list[str]:
    """What bash completion offers for ``words`` (the word at ``cword`` being typed)."""
    env = {"_JACPIPE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    result = CliRunner().invoke(app, [], env=env, prog_name="jacpipe")
    assert result.exit_code == 0, result.output
    return result.output.split()


@pytest.mark.parametrize("command", ["run", "submit"])
def test_job_names_complete(command):
    from pipeline.problem.problem import builtin_jobs

    assert complete(f"jacpipe {command} ro", 2) == ["robot_arm", "rosenbrock"]
    assert complete(f"jacpipe {command} ", 2) == builtin_jobs()
    assert complete(f"jacpipe {command} zz", 2) == []


@pytest.mark.parametrize("env,coloured", [
    ({}, True), ({"NO_COLOR": "1"}, False), ({"NO_COLOR": ""}, True),  # empty: not set
])
def test_error_line_honours_no_color(env, coloured):
    result = CliRunner().invoke(app, ["run", "mpl"], env=env, color=True)
    assert result.exit_code == 2
    line = next(x for x in result.output.splitlines() if "error: unknown job 'mpl'" in x)
    assert line.startswith("\x1b[31merror:") is coloured, repr(line)
    assert ("\x1b[" in result.output) is coloured


def test_no_color_uncolours_every_line_a_command_styles():
    """Warnings and verdicts (``typer.secho``) of any jacpipe command, not only ``error:``."""
    import typer

    from pipeline.cli.common import JacpipeGroup

    demo = typer.Typer(cls=JacpipeGroup)

    @demo.command()
    def warn() -> None:
        typer.secho("warning: careful", fg=typer.colors.YELLOW, err=True)
        typer.secho("MATCH", fg=typer.colors.GREEN, bold=True)

    @demo.command()
    def other() -> None:
        pass

    plain = CliRunner().invoke(demo, ["warn"], env={"NO_COLOR": "1"}, color=True)
    assert plain.exit_code == 0 and plain.output.split() == ["warning:", "careful", "MATCH"]
    styled = CliRunner().invoke(demo, ["warn"], color=True)
    assert "\x1b[33mwarning: careful" in styled.output
