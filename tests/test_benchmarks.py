"""The benchmark suite runs: every module imports, tables print, quick runs finish."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import Report, markdown_table
from benchmarks.run_all import BENCHMARKS

ROOT = Path(__file__).resolve().parents[1]
#: Every benchmark module (the run_all ones and the separate ones).
MODULES = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                 if p.stem not in {"__init__", "__main__"})


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_module_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    if name in BENCHMARKS:
        assert callable(module.main), name


def test_markdown_table_formats_mixed_cells():
    table = markdown_table(["m", "pid", "command", "GiB"],
                           [["1,000", 4242, "raylet", 0.5], ["4,000", "17", None, 123.0]])
    lines = table.splitlines()
    assert lines[0] == "| m     | pid  | command | GiB |"
    assert lines[2] == "| 1,000 | 4242 | raylet  | 0.5 |"
    assert lines[3] == "| 4,000 | 17   | None    | 123 |"


def test_markdown_table_of_no_rows_is_its_header():
    """The memory benchmark's "Other processes" table is empty under the local executor."""
    assert markdown_table(["m", "pid"], []).splitlines() == ["| m | pid |", "|---|-----|"]


def test_report_writes_an_empty_table(tmp_path, capsys):
    report = Report("demo", quick=True)
    report.table("Other processes", ["m", "pid"], [])
    path = report.finish(tmp_path / "demo.json")
    assert "### Other processes" in capsys.readouterr().out
    assert json.loads(path.read_text())["tables"][0]["rows"] == []


def run_quick(name: str, result: Path) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.NAME --quick``, its result file at ``result`` (not in the repo)."""
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--json", str(result)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_memory_benchmark_runs_in_quick_mode(tmp_path):
    """``python -m benchmarks --quick`` ended "FAILED: memory" on its empty table."""
    proc = run_quick("memory", tmp_path / "memory.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Other processes" in proc.stdout
    doc = json.loads((tmp_path / "memory.json").read_text())
    assert doc["quick"] and len(doc["tables"]) == 2 and doc["tables"][1]["rows"]
    peak, *growth = doc["targets"]
    assert 0 < peak["value"] < 64 and len(growth) == 2  # GiB; driver and worker growth


#: The benchmarks of ``make bench`` whose quick mode takes under a minute here
#: (end_to_end, sparse and batched_hessian take minutes).
CHEAP = ("engine", "parquet_io")


@pytest.mark.slow
@pytest.mark.parametrize("name", CHEAP)
def test_cheap_benchmarks_run_in_quick_mode(name, tmp_path):
    proc = run_quick(name, tmp_path / f"{name}.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    assert doc["benchmark"] == name and doc["quick"]
    assert doc["tables"] and all(t["rows"] for t in doc["tables"]) and doc["targets"]
    assert "targets (quick mode" in proc.stdout
