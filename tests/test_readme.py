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


def help_first_example() -> list[str]:
    """The command ``jacpipe --help`` suggests first (its epilog's last ``jacpipe run``)."""
    epilog = app.info.epilog or ""
    return shlex.split(epilog[epilog.rindex("jacpipe run"):])


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


#: ``<!-- readme-test: skip (why) -->`` on the line above a shell block skips it;
#: ``<!-- readme-test: skip `make test` (why) -->`` only its lines starting so.
SKIP = re.compile(r"<!-- readme-test: skip(?: `([^`]+)`)? \(([^)]+)\) -->\n```bash\n\Z")


def shell_blocks() -> list[tuple[str, str | None]]:
    """The README's ``bash`` blocks in order: (the commands to run, why some were skipped)."""
    assert not re.search(r"```(sh|shell|console|zsh)\n", README)  # commands are ```bash
    blocks = []
    for match in re.finditer(r"```bash\n(.*?)```", README, flags=re.S):
        skip = SKIP.search(README[:match.start(1)])
        code = match.group(1)
        if skip and skip.group(1):
            code = "".join(line for line in code.splitlines(keepends=True)
                           if not line.startswith(skip.group(1)))
        elif skip:
            code = ""
        blocks.append((code, skip.group(2) if skip else None))
    return blocks


def fresh_clone(dest: Path) -> dict[str, str]:
    """The checkout's tracked files copied to ``dest``, set up as ``make run`` leaves a clone.

    Its ``.venv`` is this interpreter's (already installed: the ``make``
    stamp is made newer than what it depends on), whose editable install
    points at this checkout, so ``PYTHONPATH`` names the copy. Returns the
    environment of a shell where ``source .venv/bin/activate`` ran.
    """
    import shutil

    venv = Path(sys.executable).parents[1]
    if not (venv / ".installed").exists() or not (venv / "bin" / "jacpipe").exists():
        pytest.skip(f"{venv} is not a venv made by `make setup`")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / ".venv").symlink_to(venv)
    for dependency in ("pyproject.toml", "constraints.txt"):
        os.utime(dest / dependency, (0, 0))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "JACPIPE_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=f"{dest / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(dest), NO_COLOR="1")
    return env


@pytest.mark.slow
def test_every_shell_block_runs_as_written_in_a_fresh_clone(tmp_path):
    """The README's shell blocks, in order, in a copy of the checkout: a newcomer's path.

    The help's first example runs before the quick tour (it writes out/mlp,
    which the tour must not collide with); everything lands under out/. About
    4 to 7 minutes on 2 cores at a load average of 10 to 14 (each command imports torch).
    """
    clone = tmp_path / "jacpipe"
    env = fresh_clone(clone)
    blocks = shell_blocks()
    skipped = [why for code, why in blocks if not code.strip()]
    assert len(skipped) <= 4, skipped  # few, each with its reason in the README
    outputs, ran = [], set()
    for code, _ in blocks:
        if "jacpipe jobs" in code:
            code = shlex.join(help_first_example()) + "\n" + code
        # A line the README repeats (the tour's `contact` line) runs once.
        code = "".join(line for line in code.splitlines(keepends=True) if line not in ran)
        ran.update(code.splitlines(keepends=True))
        if not code.strip():
            continue
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (code, proc.stdout[-2000:], proc.stderr[-3000:])
        outputs.append(proc.stdout + proc.stderr)
    text = "\n".join(outputs)
    assert text.count("MATCH") >= 4 and "MISMATCH" not in text  # make run and the --verify runs
    made = {p.name for p in clone.iterdir()} - {p.split("/")[0] for p in _tracked()} - {".venv"}
    assert made == {"out"}, made  # the tour leaves nothing in the repository root
    for name in ("make-run", "tour", "mlp", "mine", "contact-smooth", "poisson", "ac", "lj"):
        assert (clone / "out" / name / "_manifest.parquet").exists(), name
    assert (clone / "out/J.npy").exists() and (clone / "out/J.png").stat().st_size > 1000
    assert (clone / "out/poisson.png").stat().st_size > 1000


def _tracked() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.splitlines()


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
