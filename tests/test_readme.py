"""Every command and code example of the README runs here."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def test_readme_starts_with_the_two_setup_commands():
    lang, first = BLOCKS[0]
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert commands == ["make run", "make test"]
    assert README.index("```") < README.index("## ")


def test_user_job_example_is_the_shipped_file():
    block = next(code for lang, code in BLOCKS if lang == "python" and "def build" in code)
    shipped = (Path(__file__).resolve().parents[1] / "examples" / "my_job.py").read_text()
    assert block.strip() == shipped.strip()


def tour_commands(marker: str = "jacpipe jobs"):
    block = next(code for lang, code in BLOCKS if lang == "bash" and marker in code)
    for line in block.strip().splitlines():
        for part in line.split("#")[0].split("&&"):
            if part.strip():
                yield shlex.split(part.strip())


def help_first_example() -> list[str]:
    """The command ``jacpipe --help`` suggests first (its epilog's last ``jacpipe run``)."""
    epilog = app.info.epilog or ""
    return shlex.split(epilog[epilog.rindex("jacpipe run"):])


def test_quick_tour_commands_run(ray_session, tmp_path, monkeypatch):
    """After the help's first example (it writes out/mlp), the tour runs, writing under out/."""
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    # Workers import examples.my_job from the repository, as a user's workers
    # import their package from the driver's working directory.
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    del sys
    first = help_first_example()
    assert first[:2] == ["jacpipe", "run"]
    ran = 0
    for argv in [first, *tour_commands()]:
        assert argv[0] == "jacpipe"
        result = runner.invoke(app, argv[1:], catch_exceptions=False)
        assert result.exit_code == 0, (argv, result.output)
        ran += 1
    assert ran >= 8
    assert (tmp_path / "out/J.png").exists() and (tmp_path / "out/J.npy").exists()
    assert (tmp_path / "out/mine/_manifest.parquet").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("command", ["run", "compare", "inspect", "export"])
def test_help_examples_write_under_out(command):
    """Every command's example names files under out/, as the quick tour does.

    ``run``'s example names its own --out: out/mlp (its default) holds the
    help's first example, with other parameters, and would be refused.
    """
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    example = shlex.split(result.output[result.output.index("Example: "):].split("\n")[0])
    paths = [a for a in example[2:] if "/" in a or "." in a.split("=")[-1]]
    assert paths and all(p.startswith("out/") for p in paths), example
    if command == "run":
        assert example[example.index("--out") + 1] != "out/mlp"


@pytest.mark.slow
def test_higher_order_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in tour_commands("jacpipe run poisson"):
        result = CliRunner().invoke(app, argv[1:], catch_exceptions=False)
        assert result.exit_code == 0, (argv, result.output)
        ran.append(argv[1])
        if "--verify" in argv:
            assert "MATCH" in result.output and "MISMATCH" not in result.output
    assert ran.count("run") == 3 and "inspect" in ran
    assert (tmp_path / "out/poisson.png").stat().st_size > 1000


def test_taylor_example_runs_as_written():
    (code,) = [code for lang, code in BLOCKS if lang == "python" and "pipeline.taylor(" in code]
    exec(compile(code, "README.md", "exec"), {})  # its asserts compare with torch.func


def test_parameter_jacobian_example_runs_as_written():
    (code,) = [code for lang, code in BLOCKS if lang == "python" and "from_module(" in code]
    exec(compile(code, "README.md", "exec"), {})  # its asserts compare with torch.func


def test_python_examples_run_against_a_real_result(ray_session, tmp_path):
    """Each snippet runs alone, in a fresh interpreter, as a reader would paste it."""
    out = tmp_path / "make-run"
    result = CliRunner().invoke(app, ["run", "mlp", "-p", "n=120", "-p", "m=100",
                                      "--shards", 3, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    examples = [code for lang, code in BLOCKS
                if lang == "python" and "out/make-run" in code]
    assert len(examples) >= 2
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
    for code in examples:
        code = code.replace("out/make-run", str(out))
        check = code + "\nassert J.shape == (100, 120), J.shape\n" if "J = " in code else code
        proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (code, proc.stderr[-3000:])


@pytest.mark.parametrize("command", ["jobs", "run", "compare", "inspect"])
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_every_row_of_the_bad_input_table_names_an_existing_test():
    import re

    readme = Path("README.md").read_text()
    doc = readme[readme.index("## When something goes wrong"):]
    doc = doc[: doc.find("\n## ", 1)] if "\n## " in doc[1:] else doc
    rows = [line for line in doc.splitlines()
            if line.startswith("| ") and not line.startswith("| You give")]
    assert len(rows) >= 40
    for row in rows:
        (node,) = re.findall(r"<!-- (tests/\S+\.py)::(\w+)(?:\[[^\]]*\])? -->", row) or [None]
        assert node is not None, row
        path, name = node
        assert f"def {name}(" in Path(path).read_text(), row


def cli_synopsis() -> str:
    """The README's ``jacpipe run`` synopsis (the block of the ``## CLI`` section)."""
    section = README[README.index("## CLI"):]
    return next(code for lang, code in re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)
                if "jacpipe run JOB" in code)


def run_flags() -> list[str]:
    """Every flag of ``jacpipe run``: the run options' and the command's own."""
    import dataclasses

    from pipeline.core.options import CLI, RunOptions

    flags = [flag for f in dataclasses.fields(RunOptions) if CLI in f.metadata
             for decl in f.metadata[CLI]["flags"] for flag in decl.split("/")]
    group = typer.main.get_command(app)
    with group.make_context("jacpipe", ["run", "--help"], resilient_parsing=True) as ctx:
        command = group.get_command(ctx, "run")  # type: ignore[attr-defined]
    flags += [o for p in command.params for o in [*p.opts, *p.secondary_opts]
              if o.startswith("-") and o not in ("-h", "--help")]
    return sorted(set(flags))


def test_cli_synopsis_names_every_run_option():
    synopsis = cli_synopsis()
    flags = run_flags()
    assert {"-o", "--executor", "--sparsity", "--smooth", "--compression",
            "--shard-timeout", "--kind", "--verify", "--json"} <= set(flags)
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", synopsis)]
    assert not missing, f"the README's CLI synopsis omits {missing}"


def test_cli_synopsis_lists_each_option_s_choices():
    from pipeline.core.options import CHOICES

    synopsis = cli_synopsis()
    for name, choices in CHOICES.items():
        assert f"--{name.replace('_', '-')} {'|'.join(choices)}" in synopsis, name


def test_batched_shape_quoted_for_robot_arm_is_the_job_s():
    """The README quotes ``robot_arm -p batch=200`` as ``inspect`` shows it: B x (m x n)."""
    from pipeline.problem.problem import resolve_builder

    quoted = re.search(r"`robot_arm -p batch=(\d+)`: `\1 x \((\d+) x (\d+)\)`", README)
    assert quoted is not None
    b, m, n = map(int, quoted.groups())
    problem = resolve_builder("robot_arm")(batch=b)
    assert tuple(problem.x.shape) == (b, n)
    assert tuple(problem.fn(problem.x[0]).shape) == (m,)


def test_dev_extras_the_readme_uses_are_marked_as_such():
    """pandas, Polars and DuckDB come with ``.[dev]``, and the README says so where it uses them."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {re.split(r"[\[<>=]", d)[0] for d in project["dependencies"]}
    dev = {re.split(r"[\[<>=]", d)[0] for d in project["optional-dependencies"]["dev"]}
    imported = {m for _, code in BLOCKS for m in re.findall(r"^import (\w+)", code, flags=re.M)}
    extras = sorted(imported & dev)
    assert {"pandas", "polars", "duckdb"} <= set(extras)
    assert not imported & dev & runtime
    section = README[README.index("## Reading results"):]
    intro = section[:section.index("```")]
    assert "'.[dev]'" in intro
    sentence = next(x for x in intro.replace("\n", " ").split(". ") if "dev extras" in x)
    assert all(name in sentence.lower() for name in extras), (extras, sentence)
