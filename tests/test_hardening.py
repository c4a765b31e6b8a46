"""Hardening (issue 14): signals, stalls, the commit log, job specs, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from benchmarks.soak import kill_session, session_processes, wait_for_commits
from pipeline import read_jacobian
from pipeline.cli import app
from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions
from pipeline.problem.problem import resolve_builder
from pipeline.runner import driver as runner
from pipeline.runner import scheduler
from pipeline.store.manifest import COMMIT_LOG, Manifest
from pipeline.store.storage import Storage
from tests.manifests import read_doc, write_doc

CRASHY = "tests.faultjobs:crashy"
CHUNKS = ["--chunk-size", "4", "--method", "rev"]
cli = CliRunner()


def _run(*args: object):
    return cli.invoke(app, [str(a) for a in args])


def _one_error(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("spec,match", [
    ("../../etc/passwd:build", "dotted Python names"),
    (".hidden:build", "dotted Python names"),
    ("tests.userjobs:", "dotted Python names"),
    ("os.path:join extra", "dotted Python names"),
])
def test_job_specs_are_validated_before_any_import(spec, match):
    with pytest.raises(JacpipeError, match=match):
        resolve_builder(spec)


def test_job_modules_that_fail_to_import_exit_2_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_syntax_job.py").write_text("def build(:\n")
    (tmp_path / "raising_job.py").write_text("raise RuntimeError('no licence server')\n")
    result = _run("run", "broken_syntax_job:build", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "syntax error" in _one_error(result)
    result = _run("run", "raising_job:build", "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert "raised RuntimeError: no licence server" in _one_error(result)


def test_sigterm_is_handled_like_ctrl_c(ray_session, tmp_path):
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
            proc.send_signal(signal.SIGTERM)  # the driver only, as `kill PID` would
            proc.wait(timeout=120)
        finally:
            kill_session(proc, sig=signal.SIGKILL)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == scheduler.SIGTERM_EXIT, stderr
    assert "Traceback" not in stderr and "*** SIGTERM" not in stderr, stderr
    assert session_processes(proc.pid) == []
    man = Manifest.read(Storage(str(out)))
    assert man.status == "interrupted" and 2 <= len(man.shards) < 12
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: terminated (SIGTERM): {len(man.shards)} of 12 shards committed "
                      f"in {out}; rerun the same command to resume"]
    result = _run("run", CRASHY, "-p", f"markers={markers}", "-p", "delay=0.3", "--shards", 12,
                  *CHUNKS, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"{len(man.shards)} resumed" in result.output


def test_sigterm_inside_ray_wait_is_an_interrupt_not_a_system_error(ray_session):
    """scheduler.Terminated: Ray's signal check in ray.wait lets only KeyboardInterrupt through.

    A SIGTERM that lands while the driver blocks in ``ray.wait`` (long shards)
    used to end the run as "SystemError: <cyfunction CoreWorker.wait> returned
    a result with an exception set", its folder marked failed.
    """
    import threading
    import time

    @ray_session.remote(num_cpus=0)
    def sleeper():
        time.sleep(3)

    ref = sleeper.remote()
    seen = scheduler._Sigterm()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    with pytest.raises(KeyboardInterrupt), scheduler._sigterm_as_interrupt(seen):
        timer.start()
        ray_session.wait([ref], timeout=10)
    timer.join()
    assert seen.received
    assert signal.getsignal(signal.SIGTERM) is not None  # the handler was put back
    ray_session.get(ref)


def test_a_straggler_is_reported_and_the_timeout_fails_the_run_resumably(
    ray_session, tmp_path, monkeypatch
):
    monkeypatch.setattr(scheduler, "STALL_FACTOR", 3.0)
    monkeypatch.setattr(scheduler, "STALL_MIN_SECONDS", 1.0)
    job = "tests.faultjobs:slow_shard"
    # warm the workers (torch imported, job built) so only the straggler is slow
    runner.run(RunOptions(job=job, params=["shard=99"], shards=2, out=str(tmp_path / "warm"),
                          progress=False), echo=lambda _: None)
    lines: list[str] = []
    opts = dict(job=job, params=["seconds=6"], shards=6, chunk_size=64,
                out=str(tmp_path / "out"), progress=False, max_in_flight=2)
    with pytest.raises(scheduler.ShardTimeout, match="ran past --shard-timeout 4s"):
        runner.run(RunOptions(**opts, shard_timeout=4), echo=lines.append)
    man = Manifest.read(Storage(opts["out"]))
    assert man.status == "failed" and 0 in man.shards and 1 not in man.shards
    lines.clear()
    summary = runner.run(RunOptions(**opts), echo=lines.append)  # resumes, waits it out
    assert summary.skipped >= 1 and summary.manifest.status == "complete"
    assert any("warning: shard 1 has run" in line and "median shard" in line for line in lines), (
        lines, summary.manifest.to_json()["shards"])


def test_commits_append_to_a_log_that_readers_merge_before_compaction(ray_session, tmp_path):
    out = tmp_path / "out"
    opts = RunOptions(job="mlp", params=["n=20", "m=30", "hidden=8"], shards=5, out=str(out),
                      progress=False)
    runner.run(opts, echo=lambda _: None)
    assert not (out / COMMIT_LOG).exists()  # compacted into the manifest at the end
    full = read_jacobian(out)
    # A killed run: the manifest lists 2 shards, the log holds the other 3 (and a torn line).
    doc = read_doc(out)
    tail = doc["shards"][2:]
    doc["shards"], doc["status"] = doc["shards"][:2], "running"
    write_doc(out, doc)
    with open(out / COMMIT_LOG, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in tail)
        f.write('{"index": 4, "sta')  # torn by the crash: not a commit
    np.testing.assert_array_equal(read_jacobian(out), full)
    info = json.loads(_run("inspect", out, "--json").output)
    assert info["shards_committed"] == 5 and info["problems"] == []
    # Resume compacts the log into the manifest and keeps every shard.
    summary = runner.run(opts, echo=lambda _: None)
    assert summary.skipped == 5 and not (out / COMMIT_LOG).exists()
    assert len(read_doc(out)["shards"]) == 5


def test_one_run_per_folder(tmp_path):
    from pipeline.store.folder import ResultFolder

    first, second = ResultFolder(Storage(str(tmp_path))), ResultFolder(Storage(str(tmp_path)))
    first.lock("run-a")
    with pytest.raises(JacpipeError, match=r"in use by another run \(run run-a, pid"):
        second.lock("run-b")
    first.unlock()
    second.lock("run-b")  # free again
    second.unlock()


def test_a_killed_runs_lock_does_not_block(tmp_path):
    code = ("import os, sys; from pipeline.store.folder import ResultFolder; "
            "from pipeline.store.storage import Storage; "
            f"ResultFolder(Storage({str(tmp_path)!r})).lock('dead'); os._exit(9)")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ,
                          PYTHONPATH=os.getcwd()), timeout=60)
    assert done.returncode == 9 and (tmp_path / ".lock").exists()
    from pipeline.store.folder import ResultFolder

    folder = ResultFolder(Storage(str(tmp_path)))
    folder.lock("alive")  # the kernel dropped the dead process's flock
    folder.unlock()


def test_stray_parts_are_reported_and_moved_aside_on_resume(ray_session, tmp_path):
    out = tmp_path / "out"
    opts = RunOptions(job="mlp", params=["n=20", "m=30", "hidden=8"], shards=3, out=str(out),
                      progress=False)
    runner.run(opts, echo=lambda _: None)
    full = read_jacobian(out)
    (out / "part-00099.parquet").write_bytes((out / "part-00001.parquet").read_bytes())
    info = json.loads(_run("inspect", out, "--json").output)
    assert info["stray_files"] == ["part-00099.parquet"]
    lines: list[str] = []
    runner.run(opts, echo=lines.append)
    assert any("moved 1 file(s)" in line and "_stray" in line for line in lines), lines
    assert (out / "_stray" / "part-00099.parquet.stray").exists()
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    assert len(pd.read_parquet(out)) == 30 and ds.dataset(out).count_rows() == 30
    # Polars reads "_" folders too: it refuses the folder rather than count the stray's rows.
    with pytest.raises(Exception, match="different file extensions"):
        pl.read_parquet(out)
    shutil.rmtree(out / "_stray")
    assert pl.read_parquet(out).height == 30
    np.testing.assert_array_equal(read_jacobian(out), full)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["shapes"].__setitem__("out_shape", [10**13]), "out of range"),
    (lambda d: d["shapes"].__setitem__("n", 7), "'shapes.n' is 7"),
    (lambda d: d.__setitem__("layout", "diagonal"), "unknown layout"),
    (lambda d: d["shapes"].__setitem__("dtype", "float16"), "dtype 'float16'"),
])
def test_tampered_manifests_are_one_line_exit_2(ray_session, tmp_path, edit, match):
    out = tmp_path / "out"
    runner.run(RunOptions(job="mlp", params=["n=8", "m=6", "hidden=4"], shards=2, out=str(out),
                          progress=False), echo=lambda _: None)
    doc = read_doc(out)
    edit(doc)
    write_doc(out, doc)
    for cmd in (["inspect", out], ["compare", out]):
        result = _run(*cmd)
        assert result.exit_code == 2 and match in _one_error(result)


def test_folder_problems_exit_2(tmp_path):
    (tmp_path / "o" / "_manifest.parquet").mkdir(parents=True)
    result = _run("inspect", tmp_path / "o")
    assert result.exit_code == 2 and "is a folder" in _one_error(result)
    result = _run("run", "mlp", "--out", "")
    assert result.exit_code == 2 and "--out is empty" in _one_error(result)


def test_reading_never_runs_the_job_a_manifest_names(ray_session, tmp_path):
    out = tmp_path / "out"
    runner.run(RunOptions(job="tests.userjobs:matrix_io", shards=2, out=str(out),
                          progress=False), echo=lambda _: None)
    doc = read_doc(out)
    marker = tmp_path / "pwned"
    doc["job"], doc["params"] = "os:system", {"command": f"touch {marker}"}
    write_doc(out, doc)
    for cmd in (["compare", out], ["compare", out, "--fd"], ["inspect", out],
                ["compare", out, "--job", "tests.userjobs:matrix_io"]):
        _run(*cmd)
        assert not marker.exists(), cmd
    line = _one_error(_run("compare", out))
    assert "computed by job 'os:system'" in line and "--job os:system" in line
    doc["job"] = "../../etc/passwd:build"
    write_doc(out, doc)
    assert "dotted Python names" in _one_error(_run("compare", out, "--trust-job"))
    # The user's own module:function job: named now, it is rebuilt and compared.
    doc["job"], doc["params"] = "tests.userjobs:matrix_io", {}
    write_doc(out, doc)
    assert "MATCH" in _run("compare", out, "--job", "tests.userjobs:matrix_io").output
    assert "--job tests.userjobs:matrix_io" in _one_error(_run("compare", out))
