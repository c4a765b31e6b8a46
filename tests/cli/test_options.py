"""``jacpipe run``'s options are RunOptions' fields: flags, help, defaults and choices agree."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.options import cli_fields, run_options
from pipeline.core.options import CHOICES, CLI, RunOptions

runner = CliRunner()
#: What ``jacpipe run`` takes besides the run options.
CLI_ONLY = {"verify", "rows", "as_json"}
OPTION_ROW = re.compile(r"^│\s+-")


def run_command():
    """The click command behind ``jacpipe run``."""
    group = typer.main.get_command(app)
    with group.make_context("jacpipe", ["run", "--help"], resilient_parsing=True) as ctx:
        return group.get_command(ctx, "run")


def run_help() -> str:
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.stdout


def option_rows(text: str, flag: str) -> str:
    """The help table's rows of the option ``flag`` (its help text may wrap)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if OPTION_ROW.match(line) and re.search(rf"(?<![\w-]){re.escape(flag)}\b", line))
    end = next((i for i in range(start + 1, len(lines))
                if OPTION_ROW.match(lines[i]) or not lines[i].startswith("│")), len(lines))
    return " ".join(lines[start:end])


def flags(field: dataclasses.Field) -> list[str]:
    return [name for decl in field.metadata[CLI]["flags"] for name in decl.split("/")]


def test_every_cli_field_shows_its_flags_in_help():
    text = run_help()
    assert cli_fields(), "RunOptions has no CLI fields"
    for field in cli_fields():
        for flag in flags(field):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}\b", text), (field.name, flag)
    assert "JOB" in text


def test_run_parameters_are_the_cli_fields_and_the_cli_only_ones():
    names = {p.name for p in run_command().params}
    assert names - {"help"} == {f.name for f in cli_fields()} | CLI_ONLY
    python_only = {f.name for f in dataclasses.fields(RunOptions)} - {f.name for f in cli_fields()}
    assert python_only == {"max_in_flight"}  # a new Python-only field: say so here


def test_help_text_and_flags_are_the_fields_own():
    params = {p.name: p for p in run_command().params}
    for field in cli_fields():
        facts = field.metadata[CLI]
        assert params[field.name].help.replace("\\[", "[") == facts["help"], field.name
        if facts["flags"]:
            declared = {*params[field.name].opts, *params[field.name].secondary_opts}
            assert declared == set(flags(field)), field.name


def test_defaults_in_help_are_the_dataclass_defaults():
    text = run_help()
    params = {p.name: p for p in run_command().params}
    checked = 0
    for field in cli_fields():
        if not field.metadata[CLI]["flags"] or field.default is dataclasses.MISSING:
            continue
        assert params[field.name].default == field.default, field.name
        if field.default is None or field.default is False:
            continue  # nothing (or the help text's own words) is shown
        rows = option_rows(text, flags(field)[0])
        shown = flags(field)[0].lstrip("-") if field.default is True else field.default
        assert f"[default: {shown}]" in rows, (field.name, rows)
        checked += 1
    assert checked >= 8


def test_choices_in_help_are_the_library_ones():
    text = run_help()
    assert set(CHOICES) >= {"device", "dtype", "method", "executor", "estimator"}
    for name, choices in CHOICES.items():
        field = next(f for f in cli_fields() if f.name == name)
        assert "[" + "|".join(choices) + "]" in option_rows(text, flags(field)[0]), name


def test_the_cli_builds_the_same_options_as_python(monkeypatch):
    monkeypatch.delenv("JACPIPE_EXECUTOR", raising=False)
    argv = ["mlp", "-p", "n=3", "-p", "m=2", "--shards", "2", "--method", "fwd",
            "--no-resume", "--smooth", "auto", "--estimator", "both", "--verify"]
    ctx = run_command().make_context("jacpipe run", argv)
    assert run_options(ctx.params) == RunOptions(
        job="mlp", params=["n=3", "m=2"], shards=2, method="fwd", resume=False,
        smooth="auto", estimator="both")
    monkeypatch.setenv("JACPIPE_EXECUTOR", "local")
    ctx = run_command().make_context("jacpipe run", ["mlp"])
    assert run_options(ctx.params) == RunOptions(job="mlp")
    assert run_options(ctx.params).executor == "local"


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_a_bad_choice_is_one_line_naming_the_choices(name):
    field = next(f for f in cli_fields() if f.name == name)
    result = runner.invoke(app, ["run", "mlp", flags(field)[0], "nope"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert flags(field)[0] in errors[0] and "'nope'" in errors[0]
    for choice in CHOICES[name]:
        assert choice in errors[0], (choice, errors[0])


@pytest.mark.parametrize("value", ["fast", "auto:3", "lz4:1"])
def test_a_bad_compression_is_one_line_listing_the_codecs(value):
    result = runner.invoke(app, ["run", "mlp", "--compression", value])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "--compression" in errors[0] and repr(value) in errors[0]
    if ":" not in value:
        for codec in ("auto", "zstd", "lz4", "snappy", "none", "zstd:LEVEL"):
            assert codec in errors[0], (codec, errors[0])
    else:
        assert "only zstd takes a level" in errors[0]


def test_compression_auto_is_a_run_option_of_both_the_cli_and_python():
    ctx = run_command().make_context("jacpipe run", ["mlp", "--compression", "auto"])
    assert run_options(ctx.params).compression == "auto"
    RunOptions(job="mlp", compression="auto").check()  # accepted by pipeline.run too
    assert "auto (the codec that commits fastest" in " ".join(run_help().split())


@pytest.mark.slow
def test_a_bad_choice_starts_neither_ray_nor_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom pipeline.cli import app\n"
            "r = CliRunner().invoke(app, ['run', 'mlp', '--method', 'nope'])\n"
            "assert r.exit_code == 2, r.output\n"
            "print(sorted(m for m in ('ray', 'torch', 'pyarrow') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_core_options_import_no_cli_library():
    code = ("import sys, pipeline.core.options\n"
            "print(sorted(m for m in ('typer', 'click', 'torch') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_shards_help_says_what_it_defaults_to():
    row = next(line for line in run_help().splitlines() if "--shards " in line)
    assert "Number of shards of output rows [default: 2 per task slot" in row, row
