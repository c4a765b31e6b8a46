"""``pipeline.runner.scheduler``: GPUs, retries, signals and stragglers.

GPU scheduling uses fake GPUs: Ray is told of 2 GPUs, torch sees none (CPU
fallback). That Ray part runs in a subprocess with its own
``ray.init(num_gpus=2)``: the session's shared Ray has no GPUs and cannot be
given some afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from benchmarks.soak import kill_session, session_processes, wait_for_commits
from pipeline import read_jacobian
from pipeline.cli import app
from pipeline.core.options import RunOptions
from pipeline.runner import driver as runner
from pipeline.runner import scheduler
from pipeline.store.manifest import Manifest
from pipeline.store.storage import Storage
from tests.clitools import error_line
from tests.faultruns import assert_rows_exactly_once, invoke, manifest, run_crashy

SMALL = ["n=40", "m=48", "hidden=8"]


_SCRIPT = """
    import json, sys
    import ray
    from pipeline.core.errors import JacpipeError
    from pipeline.runner.driver import RunOptions, run_command
    from tests.manifests import read_doc

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="ERROR")
    out = sys.argv[1]
    small = SMALL

    def go(name, **kw):
        opts = dict(job="mlp", params=small, shards=8, out=f"{out}/{name}", progress=False)
        opts.update(kw)
        try:
            # jacpipe run's entry: its errors name the flags the tests match
            return run_command(RunOptions(**opts), lambda s: None).manifest.to_json()
        except JacpipeError as exc:
            return {"error": str(exc)}

    def cli(name, *args):
        # The command line, as in the README's GPU section; run() finds this Ray initialised.
        from typer.testing import CliRunner
        from pipeline.cli import app

        argv = ["run", "mlp", *[a for p in small for a in ("-p", p)], "--shards", "8",
                "--out", f"{out}/{name}", "--no-progress", *args]
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        return read_doc(f"{out}/{name}")

    found = {
        "default": go("default"),
        "half": cli("half", "--gpus-per-shard", "0.5"),
        "cuda": go("cuda", device="cuda"),
        "too_many": go("too_many", gpus_per_shard=3),
        "node_max": go("node_max", gpus_per_shard=1.5),
        "heat_default": go("heat", job="heat", params=["N=6"]),
        "heat_gpu": go("heat_gpu", job="heat", params=["N=6"], gpus_per_shard=1),
        "cuda_no_gpu": go("cuda0", device="cuda", gpus_per_shard=0),
    }
    print("RESULT " + json.dumps(found))
"""


@pytest.fixture(scope="module")
def fake_gpu_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu")
    code = textwrap.dedent(_SCRIPT).replace("SMALL", repr(SMALL))
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_default_one_gpu_per_shard_spread_over_both_ids(fake_gpu_runs: dict) -> None:
    man = fake_gpu_runs["default"]
    assert man["status"] == "complete"
    assert man["options"]["gpus_per_shard"] == 1.0  # the cluster has GPUs: default 1
    shards = man["shards"]
    assert len(shards) == 8
    assert {tuple(s["gpu_ids"]) for s in shards} == {("0",), ("1",)}
    assert {s["device"] for s in shards} == {"cpu"}  # torch sees no GPU: CPU fallback
    # max_calls=0: worker processes are reused across shards (GPU tasks included)
    assert len({s["pid"] for s in shards}) < len(shards)


@pytest.mark.slow
def test_fractional_gpus(fake_gpu_runs: dict) -> None:
    man = fake_gpu_runs["half"]
    assert man["status"] == "complete"
    assert man["options"]["gpus_per_shard"] == 0.5
    assert all(len(s["gpu_ids"]) == 1 for s in man["shards"])
    assert {s["device"] for s in man["shards"]} == {"cpu"}


@pytest.mark.slow
def test_job_without_device_parameter_gets_no_gpu(fake_gpu_runs: dict) -> None:
    man = fake_gpu_runs["heat_default"]
    assert man["status"] == "complete" and man["options"]["gpus_per_shard"] == 0.0
    assert "has no `device` parameter" in fake_gpu_runs["heat_gpu"]["error"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("run", "match"),
    [
        ("cuda", "--device cuda: torch sees no CUDA device"),
        ("too_many", "--gpus-per-shard 3: the cluster has 2 GPUs"),
        ("node_max", "fractions of one GPU"),
        ("cuda_no_gpu", "--device cuda with --gpus-per-shard 0"),
    ],
)
def test_gpu_errors_are_one_line(fake_gpu_runs: dict, run: str, match: str) -> None:
    error = fake_gpu_runs[run]["error"]
    assert match in error and "\n" not in error


CRASHY = "tests.faultjobs:crashy"


CHUNKS = ["--chunk-size", "4", "--method", "rev"]


cli = CliRunner()


def _run(*args: object):
    return cli.invoke(app, [str(a) for a in args])


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
    with pytest.raises(scheduler.ShardTimeout, match="ran past shard_timeout=4s"):
        runner.run(RunOptions(**opts, shard_timeout=4), echo=lines.append)
    man = Manifest.read(Storage(opts["out"]))
    assert man.status == "failed" and 0 in man.shards and 1 not in man.shards
    lines.clear()
    summary = runner.run(RunOptions(**opts), echo=lines.append)  # resumes, waits it out
    assert summary.skipped >= 1 and summary.manifest.status == "complete"
    assert any("warning: shard 1 has run" in line and "median shard" in line for line in lines), (
        lines, summary.manifest.to_json()["shards"])


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
