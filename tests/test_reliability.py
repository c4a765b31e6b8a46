"""Reliability under real faults (issue 3): real Ray, real processes, real kills.

Worker SIGKILLs mid-shard, a driver SIGKILL, Ctrl-C, corrupt and missing part
files, crash leftovers, a garbage manifest, nondeterministic jobs, user
exceptions and NaN/Inf, plus every row of the README's bad-input table that
``tests/test_cli.py`` does not already cover. Fault-injecting jobs live in
``tests/faultjobs.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from benchmarks.soak import committed_rows, kill_session, session_processes, soak, wait_for_commits
from pipeline import read_jacobian
from pipeline.cli import app
from pipeline.core.errors import JacpipeError
from pipeline.store.manifest import MANIFEST, MANIFEST_KEY
from tests.manifests import read_doc, write_doc

runner = CliRunner()
CRASHY = "tests.faultjobs:crashy"
ROWS = 48  # crashy's default m
#: Chunks of 4 rows: every test below cuts rows into the same chunks
#: ([4k, 4k + 4)), so every result is bitwise equal to the clean run's.
CHUNKS = ["--chunk-size", "4", "--method", "rev"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    """The one ``error:`` line of a failed command (no traceback)."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def manifest(out: Path) -> dict:
    return read_doc(out)


def run_crashy(out: Path, markers: Path, *args: object):
    markers.mkdir(exist_ok=True)
    return invoke("run", CRASHY, "-p", f"markers={markers}", *args, *CHUNKS, "--out", out,
                  "--no-progress")


def assert_rows_exactly_once(out: Path, total: int = ROWS) -> None:
    rows = committed_rows(out)
    assert len(rows) == total and sorted(rows.tolist()) == list(range(total))


@pytest.fixture(scope="module")
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


# ---------------------------------------------------------------------------
# Worker deaths
# ---------------------------------------------------------------------------


def test_worker_killed_mid_shard_is_retried_and_loses_nothing(ray_session, tmp_path, clean):
    out, markers = tmp_path / "out", tmp_path / "markers"
    result = run_crashy(out, markers, "-p", "kill=1,4", "--shards", 6)
    assert result.exit_code == 0, result.output
    assert "(6 computed, 0 resumed)" in result.output

    killed = {}
    for index in (1, 4):
        facts = json.loads((markers / f"killed-{index:05d}").read_text())
        # The worker died on its 2nd chunk with the shard's temp part file open.
        assert [t.startswith(f".part-{index:05d}.") for t in facts["temps"]] == [True]
        killed[index] = facts["pid"]
    assert sorted(p.name for p in markers.iterdir()) == ["killed-00001", "killed-00004"]

    man = manifest(out)
    assert man["status"] == "complete"
    attempts = {s["index"]: s["attempt"] for s in man["shards"]}
    assert attempts == {0: 1, 1: 2, 2: 1, 3: 1, 4: 2, 5: 1}
    for s in man["shards"]:
        assert s["run_id"] == man["run_id"]
        if s["index"] in killed:
            assert s["pid"] != killed[s["index"]]  # committed by another process
    assert_rows_exactly_once(out)
    assert [n for n in os.listdir(out) if n.startswith(".")] == []  # temp files cleaned
    assert np.array_equal(read_jacobian(out), clean.values)


def test_worker_dying_on_every_attempt_is_retried_then_named(
    ray_session, tmp_path, monkeypatch
):
    import pipeline.runner.scheduler as runner_mod

    monkeypatch.setattr(runner_mod, "MAX_RETRIES", 1)
    monkeypatch.setattr(runner_mod, "_REMOTE", None)  # rebuilt with max_retries=1
    out, markers = tmp_path / "out", tmp_path / "markers"
    result = run_crashy(out, markers, "-p", "kill=0", "-p", "kill_always=true", "--shards", 2)
    line = error_line(result)
    assert result.exit_code == 1
    assert "shard 0 (rows 0..24): the worker process died 2 times (WorkerCrashedError)" in line
    assert len(list(markers.glob("killed-00000-*"))) == 2  # Ray retried exactly once
    man = manifest(out)
    assert man["status"] == "failed" and 0 not in {s["index"] for s in man["shards"]}


def test_user_exception_is_not_retried_and_summarised_in_one_line(
    ray_session, tmp_path, monkeypatch
):
    # A run on a Ray it does not own never cancels the other tasks: ray.cancel
    # races their completion inside Ray and can abort the whole driver
    # (NOTE: [Stopping tasks without ray.cancel] in pipeline/runner.py).
    cancelled: list = []
    monkeypatch.setattr(ray_session, "cancel", lambda *a, **k: cancelled.append(a))
    markers = tmp_path / "markers"
    markers.mkdir()
    out = tmp_path / "out"
    result = invoke("run", "tests.faultjobs:raises_counted", "-p", f"markers={markers}",
                    "-p", "shard=1", "--shards", 4, "--method", "rev", "--out", out,
                    "--no-progress")
    line = error_line(result)
    assert result.exit_code == 1
    assert line.startswith(
        "error: shard 1 (rows 10..20) failed: ValueError: boom: the user's backward failed"
    )
    assert "faultjobs.py" in line and "in backward" in line  # the user's frame
    assert (markers / "raised").read_text().count("\n") == 1  # ran once: not retried
    man = manifest(out)
    assert man["status"] == "failed"
    assert 1 not in {s["index"] for s in man["shards"]}
    assert not list(out.glob(".part-00001.*"))  # the writer dropped its temp file
    assert cancelled == []


def test_nondeterministic_job_is_detected_and_nothing_is_committed(ray_session, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "tests.userjobs:nondeterministic", "--shards", 4, "--out", out,
                    "--no-progress")
    line = error_line(result)
    assert result.exit_code == 2
    assert "nondeterministic job: fn(x) differs between the driver and a worker" in line
    assert "seed every random draw" in line and "shard " in line
    man = manifest(out)
    assert man["status"] == "failed" and man["shards"] == []
    assert not list(out.glob("part-*.parquet"))


# ---------------------------------------------------------------------------
# Driver deaths: SIGKILL and Ctrl-C
# ---------------------------------------------------------------------------


def test_driver_sigkill_and_worker_kills_then_resume_loses_and_duplicates_nothing(
    ray_session, tmp_path
):
    """The soak benchmark, small: 24 shards, 3 worker kills, one driver SIGKILL."""
    report = soak(shards=24, kill_fraction=0.125, seed=0, workdir=tmp_path, num_cpus=2,
                  delay=0.25, kill_driver_after=8, echo=lambda s: None)
    assert report["worker_kills"] == report["worker_kills_planned"] == 3
    k = report["committed_at_driver_kill"]
    assert 8 <= k < 24
    # The rerun computed exactly the shards the killed driver had not committed.
    assert report["computed_on_resume"] == 24 - k and report["resumed"] == k
    assert report["computed_by_resume_run_id"] == 24 - k
    assert report["ray_processes_alive_after_kill"] == 0
    assert report["rows_lost"] == 0 and report["rows_duplicated"] == 0
    assert report["values_equal_clean_run"] is True
    assert report["leftover_temp_files"] == [] and report["status"] == "complete"
    assert report["ok"] is True


def test_ctrl_c_exits_130_and_leaves_the_folder_resumable(ray_session, tmp_path, clean):
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    cmd = [sys.executable, "-m", "pipeline.cli", "run", CRASHY, "-p", f"markers={markers}",
           "-p", "delay=0.3", "--shards", "12", *CHUNKS, "--num-cpus", "2", "--out", str(out),
           "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            wait_for_commits(out, 2, proc)
        finally:
            # Like a terminal's Ctrl-C: SIGINT to the whole foreground process group.
            reaped = kill_session(proc, sig=signal.SIGINT)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, stderr
    assert reaped == 0 and session_processes(proc.pid) == []  # embedded Ray went down too
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    man = manifest(out)
    k = len(man["shards"])
    assert man["status"] == "interrupted" and 2 <= k < 12
    assert errors == [f"error: interrupted: {k} of 12 shards committed in {out}; "
                      "rerun the same command to resume"]

    info = invoke("inspect", out, "--json")
    assert info.exit_code == 1
    problems = json.loads(info.output)["problems"]
    assert len(problems) == 12 - k and all(p.endswith("not committed") for p in problems)

    result = run_crashy(out, markers, "-p", "delay=0.3", "--shards", 12)
    assert result.exit_code == 0, result.output
    assert f"({12 - k} computed, {k} resumed)" in result.output
    man = manifest(out)
    assert sum(s["run_id"] == man["run_id"] for s in man["shards"]) == 12 - k
    assert_rows_exactly_once(out)
    assert np.array_equal(read_jacobian(out), clean.values)


# ---------------------------------------------------------------------------
# What is on disk: corrupt parts, leftovers, the manifest
# ---------------------------------------------------------------------------


def test_corrupt_and_missing_parts_are_named_and_exactly_they_are_recomputed(
    ray_session, tmp_path, clean
):
    out = copy_of_clean(clean, tmp_path)
    truncated, flipped, deleted = (out / f"part-0000{i}.parquet" for i in (2, 4, 5))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01  # same size, one bit
    flipped.write_bytes(bytes(data))
    deleted.unlink()
    expected = {
        "part-00002.parquet": "shard 2 (part-00002.parquet): corrupt (size",
        "part-00004.parquet": "shard 4 (part-00004.parquet): corrupt (checksum mismatch)",
        "part-00005.parquet": "shard 5 (part-00005.parquet): missing",
    }

    info = invoke("inspect", out, "--json")
    assert info.exit_code == 1
    problems = json.loads(info.output)["problems"]
    assert len(problems) == 3
    assert all(p.startswith(e) for p, e in zip(problems, expected.values(), strict=True))
    for command in (["inspect", out], ["compare", out, "--job", CRASHY]):
        result = invoke(*command)
        assert result.exit_code == 1 and "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert [any(f in line for line in errors) for f in expected] == [True] * 3
    assert "MISMATCH" in invoke("compare", out, "--job", CRASHY).output
    with pytest.raises(JacpipeError, match="part-00002.parquet"):
        read_jacobian(out)

    before = manifest(out)
    result = run_crashy(out, clean.markers, "--shards", 6)
    assert result.exit_code == 0, result.output
    assert "(3 computed, 3 resumed)" in result.output
    man = manifest(out)
    fresh = sorted(s["index"] for s in man["shards"] if s["run_id"] == man["run_id"])
    assert fresh == [2, 4, 5] and man["run_id"] != before["run_id"]
    assert invoke("inspect", out).exit_code == 0
    assert np.array_equal(read_jacobian(out), clean.values)


def test_crash_leftovers_are_ignored_by_every_reader_and_cleaned_on_resume(
    ray_session, tmp_path, clean
):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    out = copy_of_clean(clean, tmp_path)
    part3 = (out / "part-00003.parquet").read_bytes()
    leftovers = {
        ".part-00003.0123456789abcdef.tmp": part3[: len(part3) // 2],  # half a part file
        ".part-00001.fedcba9876543210.tmp": part3,  # a whole, valid, uncommitted part
        "._manifest.parquet.0a1b2c.tmp": b"PAR1 half a manifest",
        ".attempt-0123456789ab-00002-deadbeef": b"",
        "..attempt-0123456789ab-00002-cafe.0d0e.tmp": b"",
    }
    for name, data in leftovers.items():
        (out / name).write_bytes(data)

    assert np.array_equal(read_jacobian(out), clean.values)
    info = invoke("inspect", out, "--json")
    assert info.exit_code == 0 and json.loads(info.output)["problems"] == []
    cmp = invoke("compare", out, "--json", "--job", CRASHY)
    assert cmp.exit_code == 0 and json.loads(cmp.output)["ok"] is True
    table = ds.dataset(out, format="parquet").to_table(columns=["row"])
    assert sorted(table.column("row").to_pylist()) == list(range(ROWS))
    frame = pd.read_parquet(out)
    assert sorted(frame["row"]) == list(range(ROWS))
    values = np.stack(frame.sort_values("row")["values"].to_numpy())
    assert np.array_equal(values, clean.values)
    assert sorted(pl.read_parquet(f"{out}/*.parquet")["row"].to_list()) == list(range(ROWS))
    query = f"select count(distinct row), count(*) from '{out}/*.parquet'"
    assert duckdb.sql(query).fetchall() == [(ROWS, ROWS)]

    result = run_crashy(out, clean.markers, "--shards", 6)
    assert result.exit_code == 0, result.output
    assert "(0 computed, 6 resumed)" in result.output
    assert [n for n in os.listdir(out) if n.startswith(".")] == []
    assert np.array_equal(read_jacobian(out), clean.values)


def _raw(change):
    """Corrupt the manifest file's bytes."""

    def apply(out):
        path = out / MANIFEST
        path.write_bytes(change(path.read_bytes()))

    return apply


def _edit(change):
    """Corrupt the manifest document inside a valid container."""

    def apply(out):
        man = read_doc(out)
        change(man)
        write_doc(out, man)

    return apply


def _not_json(out):
    path = out / MANIFEST
    schema = pq.read_schema(path)
    pq.write_metadata(schema.with_metadata({MANIFEST_KEY: b'{"format_version": 1, "sh'}), path)


CORRUPT_MANIFESTS = {
    "truncated": _raw(lambda raw: raw[: len(raw) // 2]),
    "garbage bytes": _raw(lambda raw: b"\xff\xfe\x00 not json"),
    "empty": _raw(lambda raw: b""),
    "not JSON inside": _not_json,
    "a Parquet file of no manifest": lambda out: pq.write_metadata(
        pq.read_schema(out / MANIFEST).with_metadata({}), out / MANIFEST
    ),
    "entry names another file": _edit(
        lambda m: m["shards"][1].update(file="../../etc/passwd")
    ),
    "entry for other rows": _edit(lambda m: m["shards"][2].update(start=1)),
    "duplicate entry": _edit(lambda m: m["shards"].append(dict(m["shards"][0]))),
    "no shapes": _edit(lambda m: m.pop("shapes")),
}


@pytest.mark.parametrize("how", list(CORRUPT_MANIFESTS))
def test_corrupt_manifest_is_one_clear_error(ray_session, tmp_path, clean, how):
    out = copy_of_clean(clean, tmp_path)
    path = out / MANIFEST
    CORRUPT_MANIFESTS[how](out)
    for command in ("inspect", "compare"):
        line = error_line(invoke(command, out))
        assert f"{path} is corrupt" in line and "--overwrite" in line
    with pytest.raises(JacpipeError, match="is corrupt"):
        read_jacobian(out)
    line = error_line(run_crashy(out, clean.markers, "--shards", 6))
    assert f"{path} is corrupt" in line
    if how == "truncated":  # --overwrite starts again from nothing
        result = run_crashy(out, clean.markers, "--shards", 6, "--overwrite")
        assert result.exit_code == 0, result.output
        assert "(6 computed, 0 resumed)" in result.output
        assert np.array_equal(read_jacobian(out), clean.values)


# ---------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------


def test_nan_and_inf_are_counted_per_shard_and_reported(ray_session, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "tests.faultjobs:nonfinite", "--shards", 3, "--method", "rev",
                    "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "warning: the result holds 1 NaN and 2 Inf values (shards 0, 1)" in result.output
    man = manifest(out)
    assert [(s["nan"], s["inf"]) for s in man["shards"]] == [(1, 0), (0, 2), (0, 0)]
    assert (man["nan"], man["inf"]) == (1, 2)
    values = read_jacobian(out)
    assert np.argwhere(np.isnan(values)).tolist() == [[3, 3]]
    assert np.argwhere(np.isinf(values)).tolist() == [[10, 10], [11, 11]]

    info = json.loads(invoke("inspect", out, "--json").output)
    assert (info["nan"], info["inf"]) == (1, 2)
    assert info["nan_inf_by_shard"] == {"0": [1, 0], "1": [0, 2]}
    table = invoke("inspect", out).output
    assert any("NaN / Inf" in line and "1 / 2" in line for line in table.splitlines())
    assert "1/0" in table and "0/2" in table

    # The reference has the same NaN/Inf at the same entries: a match, with the counts shown.
    cmp = invoke("compare", out, "--json", "--job", "tests.faultjobs:nonfinite")
    report = json.loads(cmp.output)
    assert cmp.exit_code == 0 and report["ok"] is True and report["mode"] == "all"
    assert (report["nan"], report["inf"]) == (1, 2)
    assert report["extra"] == {"NaN / Inf in checked rows (result | reference)": "1 / 2 | 1 / 2"}
    shown = invoke("compare", out, "--job", "tests.faultjobs:nonfinite").output
    assert "MATCH" in shown and "1 / 2 | 1 / 2" in shown


def test_non_finite_entries_match_only_the_same_non_finite_reference():
    from pipeline.analysis.compare import errors

    ref = np.array([[1.0, np.nan, np.inf]])
    assert errors(ref.copy(), ref, rtol=1e-9, atol=0.0)[2] == 0.0
    for got in ([[np.nan, np.nan, np.inf]], [[1.0, 0.0, np.inf]], [[1.0, np.nan, -np.inf]]):
        assert errors(np.array(got), ref, rtol=1e-9, atol=0.0)[2] == np.inf


# ---------------------------------------------------------------------------
# The rows of the README's bad-input table that tests/test_cli.py does not cover
# ---------------------------------------------------------------------------


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


def test_compare_option_errors(clean):
    line = error_line(invoke("compare", clean.out, "--rows", 1, "--all", "--job", CRASHY))
    assert "give --rows K or --all, not both" in line
    line = error_line(invoke("compare", clean.out, "--rows", 0, "--job", CRASHY))
    assert "--rows must be at least 1" in line


def test_job_changed_since_the_run_is_named(ray_session, tmp_path, clean):
    out = copy_of_clean(clean, tmp_path)
    man = manifest(out)
    man["fingerprint"]["y_norm"] *= 1.5  # as if build() now made another function
    write_doc(out, man)
    line = error_line(invoke("compare", out, "--job", CRASHY))
    assert "now builds a different problem than the one stored" in line
    line = error_line(run_crashy(out, clean.markers, "--shards", 6))
    assert "the job changed since these shards were written" in line
    assert "(differs in: fingerprint: y)" in line and "--overwrite" in line


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
