"""A real two-node Ray cluster on this machine, for tests marked ``cluster``.

Register with ``pytest_plugins = ["tests.cluster"]`` in ``conftest.py``.

Two ``ray start`` nodes share one machine and one private ``--temp-dir``; token
authentication is on, with a private token file (``~/.ray`` is not touched).
Teardown never uses ``ray stop``: that command kills *every* Ray process on the
machine by name, including the test session's own ``ray.init()`` cluster and
other users' clusters. Instead each ``ray start`` runs in its own process group,
and teardown signals exactly those groups plus all their descendants (Ray workers
move themselves into their own process groups, so they are found as children).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
#: Custom resources, one per node, so a test can pin a task to each node.
NODE_RESOURCES = ("node_a", "node_b")
START_TIMEOUT_S = 90.0


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class RayCluster:
    """Handle on the running two-node cluster.

    Attributes:
        dashboard_url: ``http://127.0.0.1:PORT`` of the Jobs API / dashboard.
        gcs_address: ``HOST:PORT`` for ``ray.init(address=...)`` and ``ray start``.
        env: environment for subprocesses (ray CLI, drivers, ``jacpipe``): token
            auth on, this venv first on PATH, ``RAY_API_SERVER_ADDRESS`` set.
        auth_env: only the auth variables, for ``monkeypatch.setenv`` in-process.
        token: the cluster's auth token (also in the file ``auth_env`` names).
        temp_dir: the cluster's private ``--temp-dir`` (logs are under it).
        resources: the custom resource name of each node, head first.
        startup_s: seconds the two ``ray start`` calls took until both nodes were up.
    """

    dashboard_url: str
    gcs_address: str
    env: dict[str, str]
    auth_env: dict[str, str]
    token: str
    temp_dir: Path
    resources: tuple[str, ...] = NODE_RESOURCES
    startup_s: float = 0.0
    _pgids: list[int] = field(default_factory=list, repr=False)
    _root: Path | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def headers(self) -> dict[str, str]:
        """HTTP headers that authenticate against the dashboard."""
        return {"Authorization": f"Bearer {self.token}"}

    def processes(self) -> list:
        """Every live process of this cluster (psutil.Process objects)."""
        import psutil

        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) in self._pgids:
                    found[proc.pid] = proc
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        for proc in list(found.values()):
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self, grace_s: float = 3.0) -> None:
        """Kill this cluster's processes only, then delete its temp dir. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        import psutil

        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        # Orphans that escaped the groups (none seen so far): by pgid once more.
        for pgid in self._pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def nodes_alive(self) -> int:
        """How many nodes the dashboard reports alive (0 if it does not answer)."""
        req = urllib.request.Request(
            f"{self.dashboard_url}/nodes?view=summary", headers=self.headers()
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                body = json.load(resp)
        except (urllib.error.URLError, OSError, ValueError):
            return 0
        summary = body.get("data", {}).get("summary", [])
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> int:
    """Run ``ray start ARGS`` in a new process group; return that group's id."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [ray_cli, "start", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        pgid = proc.pid
        try:
            code = proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"`ray start {' '.join(args)}` failed ({code}):\n{tail}")
    return pgid


def start_cluster(num_cpus: int = 1) -> RayCluster:
    """Start head + one worker node on 127.0.0.1 with token auth; wait until both are up.

    Args:
        num_cpus: CPUs each node advertises.

    Returns:
        The running cluster; call ``stop()`` when done.

    Raises:
        RuntimeError: a node did not start (the ``ray start`` output is included).
    """
    # Short path: Ray's unix sockets live under it and must stay < 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="jpray-", dir="/tmp"))
    temp_dir = root / "ray"
    token_file = root / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    token_file.chmod(0o600)
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}

    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    venv_bin = str(Path(sys.executable).parent)
    base["PATH"] = venv_bin + os.pathsep + base.get("PATH", "")
    base.update(auth_env)
    base["RAY_USAGE_STATS_ENABLED"] = "0"
    base["PYTHONUNBUFFERED"] = "1"

    gcs_port, dash_port = _free_port(), _free_port()
    gcs_address = f"{HOST}:{gcs_port}"
    dashboard_url = f"http://{HOST}:{dash_port}"
    common = [
        f"--node-ip-address={HOST}",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
    ]
    cluster = RayCluster(
        dashboard_url=dashboard_url,
        gcs_address=gcs_address,
        env={**base, "RAY_API_SERVER_ADDRESS": dashboard_url},
        auth_env=auth_env,
        token=token,
        temp_dir=temp_dir,
        _root=root,
    )
    atexit.register(cluster.stop)
    started = time.monotonic()
    try:
        head = [
            "--head",
            f"--port={gcs_port}",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--resources={json.dumps({NODE_RESOURCES[0]: 1})}",
        ]
        cluster._pgids.append(_ray_start(head + common, base, root / "start-head.log"))
        worker = [
            f"--address={gcs_address}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--resources={json.dumps({NODE_RESOURCES[1]: 1})}",
        ]
        cluster._pgids.append(_ray_start(worker + common, base, root / "start-worker.log"))
        deadline = time.monotonic() + START_TIMEOUT_S
        while cluster.nodes_alive() < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"two-node cluster not up after {START_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        cluster.startup_s = time.monotonic() - started
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """A two-node Ray cluster on 127.0.0.1 with token auth, torn down at session end."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``cluster`` marker."""
    config.addinivalue_line(
        "markers", "cluster: needs a real two-node Ray cluster started by `ray start` (slow)"
    )
