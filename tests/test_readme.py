"""Every command and code example of the README runs here."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
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


def test_quick_tour_commands_run(ray_session, tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    # Workers import examples.my_job from the repository, as a user's workers
    # import their package from the driver's working directory.
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    del sys
    ran = 0
    for argv in tour_commands():
        assert argv[0] == "jacpipe"
        result = runner.invoke(app, argv[1:], catch_exceptions=False)
        assert result.exit_code == 0, (argv, result.output)
        ran += 1
    assert ran >= 7
    assert (tmp_path / "J.png").exists() and (tmp_path / "out/mine/_manifest.parquet").exists()


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
