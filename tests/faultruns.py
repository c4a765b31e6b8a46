"""The crashy job's runs: a clean run to match bit for bit, and the fault tests' helpers.

Register with ``pytest_plugins = ["tests.faultruns"]`` in ``conftest.py`` (the
session fixture ``clean``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from benchmarks.soak import committed_rows
from pipeline import read_jacobian
from pipeline.cli import app
from tests.manifests import read_doc

runner = CliRunner()


CRASHY = "tests.faultjobs:crashy"


ROWS = 48  # crashy's default m


#: Chunks of 4 rows: every test below cuts rows into the same chunks
#: ([4k, 4k + 4)), so every result is bitwise equal to the clean run's.
CHUNKS = ["--chunk-size", "4", "--method", "rev"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def manifest(out: Path) -> dict:
    return read_doc(out)


def run_crashy(out: Path, markers: Path, *args: object):
    markers.mkdir(exist_ok=True)
    return invoke("run", CRASHY, "-p", f"markers={markers}", *args, *CHUNKS, "--out", out,
                  "--no-progress")


def assert_rows_exactly_once(out: Path, total: int = ROWS) -> None:
    rows = committed_rows(out)
    assert len(rows) == total and sorted(rows.tolist()) == list(range(total))


@pytest.fixture(scope="session")
def clean(ray_session, tmp_path_factory):
    """A clean 6-shard run of the crashy job (no faults): the values to match, bit for bit."""
    root = tmp_path_factory.mktemp("clean")
    out, markers = root / "out", root / "markers"
    result = run_crashy(out, markers, "--shards", 6)
    assert result.exit_code == 0, result.output
    return SimpleNamespace(out=out, markers=markers, values=read_jacobian(out))


def copy_of_clean(clean, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(clean.out, out)
    return out
