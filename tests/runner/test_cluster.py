"""``pipeline.runner.cluster``: stale cluster variables, SIGTERM while Ray starts, shutdown."""

from __future__ import annotations

import pytest


def test_stale_cluster_variables_are_one_line(tmp_path):
    from pipeline.core.errors import JacpipeError
    from pipeline.runner.cluster import refuse_stale_cluster_env

    refuse_stale_cluster_env({})
    refuse_stale_cluster_env({"RAY_ADDRESS": "local"})
    with pytest.raises(JacpipeError, match="RAY_ADDRESS=127.0.0.1:9 is set but no Ray") as exc:
        refuse_stale_cluster_env({"RAY_ADDRESS": "127.0.0.1:9"})
    assert "unset RAY_ADDRESS" in str(exc.value) and "\n" not in str(exc.value)
    gone = str(tmp_path / ".cluster" / "auth_token")
    with pytest.raises(JacpipeError, match="RAY_AUTH_MODE=token is set but the token file"):
        refuse_stale_cluster_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": gone})
    (tmp_path / "token").write_text("t0k3n\n")
    refuse_stale_cluster_env({"RAY_AUTH_MODE": "token",
                              "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")})
    refuse_stale_cluster_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x"})


# Makes ``ray.init`` wait at one point of its start-up (``before`` the node's
# processes start, or ``after`` the driver's core worker connected), having
# touched a file: the test sends SIGTERM once the file exists, not after a guess.
_WAIT_IN_RAY_INIT = """
import sys, time
import ray._private.node as node, ray._private.worker as worker
ready, where = sys.argv[1], sys.argv[2]
def waiting(original):
    def wait(*args, **kwargs):
        result = original(*args, **kwargs) if where == "after" else None
        open(ready, "w").close()
        time.sleep(120)
        return result if where == "after" else original(*args, **kwargs)
    return wait
if where == "before":
    node.Node.__init__ = waiting(node.Node.__init__)
else:
    worker.connect = waiting(worker.connect)
from pipeline.cli.app import main
sys.argv = ["jacpipe", *sys.argv[3:]]
main()
"""


@pytest.mark.slow  # a subprocess each; "after" starts Ray
@pytest.mark.parametrize(("where", "fresh"), [("before", True), ("after", True),
                                              ("after", False)])
def test_sigterm_while_ray_starts_is_one_line_and_the_folder_resumes(tmp_path, where, fresh):
    """SIGTERM during ``ray.init``: exit 143, one line, the manifest ``interrupted``.

    It used to end with exit 15 (Ray's handler) or -15 and a C++ stack (its
    core worker's), no line, and a manifest left ``running``. Into a new folder
    Ray starts while the job is checked, before the folder is prepared
    (NOTE: [Ray starts while the job is checked]); over a folder to resume,
    after.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    from torch.autograd.functional import jacobian
    from typer.testing import CliRunner

    from benchmarks.soak import kill_session, session_processes
    from pipeline import read_jacobian
    from pipeline.cli import app
    from pipeline.core.signals import SIGTERM_EXIT
    from pipeline.problem.problem import build_problem
    from pipeline.store.manifest import Manifest
    from pipeline.store.storage import Storage

    out, ready = tmp_path / "out", tmp_path / "ready"
    args = ["run", "mlp", "-p", "n=12", "-p", "m=10", "-p", "dtype=float64", "--shards", "2",
            "--out", str(out), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=os.getcwd(), NO_COLOR="1")
    if not fresh:  # a folder to resume: 1 of 2 shards committed, the other one lost
        assert CliRunner().invoke(app, [*args, "--executor", "local"]).exit_code == 0
        (out / "part-00001.parquet").unlink()
    cmd = [sys.executable, "-c", _WAIT_IN_RAY_INIT, str(ready), where, *args,
           "--executor", "ray", "--num-cpus", "1"]
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ready.exists(), (tmp_path / "stderr.txt").read_text()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            kill_session(proc, sig=signal.SIGKILL)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == SIGTERM_EXIT, stderr
    assert "Traceback" not in stderr and "*** SIGTERM" not in stderr, stderr
    assert session_processes(proc.pid) == []
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if fresh:  # Ray starts while the job is checked, before the folder is prepared
        assert errors == ["error: terminated (SIGTERM) before any shard ran; rerun the same "
                          "command"], stderr
        assert not out.exists()
    else:
        assert errors == [f"error: terminated (SIGTERM): 1 of 2 shards committed in {out}; "
                          "rerun the same command to resume"], stderr
        assert Manifest.read(Storage(str(out))).status == "interrupted"
    result = CliRunner().invoke(app, [*args, "--executor", "local"])
    assert result.exit_code == 0, result.output
    problem = build_problem("mlp", {"n": 12, "m": 10, "dtype": "float64"})
    np.testing.assert_allclose(read_jacobian(str(out)), jacobian(problem.fn, problem.x).numpy(),
                               rtol=1e-12, atol=1e-12)


def test_the_monitor_is_killed_before_ray_shutdown_and_odd_nodes_are_left_alone():
    """NOTE: [A quicker ray.shutdown]: the embedded Ray's monitor goes first; nothing else."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from pipeline.runner.cluster import _stop_monitor

    def ray_with(processes: object) -> object:
        node = SimpleNamespace(all_processes=processes)
        return SimpleNamespace(_private=SimpleNamespace(worker=SimpleNamespace(_global_node=node)))

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    monitor, raylet = subprocess.Popen(sleeper), subprocess.Popen(sleeper)
    try:
        _stop_monitor(ray_with({"monitor": [SimpleNamespace(process=monitor)],
                                "raylet": [SimpleNamespace(process=raylet)]}))
        assert monitor.poll() is not None and raylet.poll() is None  # Ray stops the raylet
        _stop_monitor(ray_with({"monitor": [SimpleNamespace(process=monitor)]}))  # gone: fine
        _stop_monitor(ray_with(None))
        _stop_monitor(SimpleNamespace())  # where Ray moved its node: the plain shutdown
    finally:
        monitor.kill()
        raylet.kill()
        raylet.wait()
