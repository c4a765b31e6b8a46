"""A real two-node Ray cluster on 127.0.0.1, token auth on: for people and for tests.

``make cluster-up`` / ``make cluster-down`` (``python -m scripts.localcluster up|down``)
and the test fixture ``ray_cluster`` (``tests/cluster.py``) both use :func:`start_cluster`.

Two ``ray start`` nodes (head + one worker) share this machine and one private,
short ``--temp-dir`` under ``/tmp`` (Ray's unix sockets must stay < 108 bytes).
Token authentication is on with a private token file; ``~/.ray`` is not touched.
Each node advertises its own custom resource (``node_a``, ``node_b``) so a task
can be pinned to a node.

Stopping never uses ``ray stop``: that command kills *every* Ray process on the
machine by name, other users' clusters and test sessions included. Each
``ray start`` runs in its own process group instead, and :meth:`LocalCluster.stop`
signals exactly the processes of those groups (checked to belong to this
cluster's temp dir) plus all their descendants (Ray workers move into their own
process groups, so they are found as children).

``up`` keeps its state (process groups, ports, token path, temp dir) in
``.cluster/`` so that ``down`` kills only what ``up`` started.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
#: Custom resources, one per node (head first), so a task can be pinned to a node.
NODE_RESOURCES = ("node_a", "node_b")
START_TIMEOUT_S = 90.0
#: Ports ``make cluster-up`` prefers (Ray's defaults) when they are free.
DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
STATE_FILE = "state.json"
ENV_FILE = "env.sh"
TOKEN_FILE = "auth_token"


class ClusterError(RuntimeError):
    """The local cluster could not be started, found or stopped (one line)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


@dataclass
class LocalCluster:
    """Handle on a running two-node cluster.

    Attributes:
        dashboard_url: ``http://127.0.0.1:PORT`` of the Jobs API / dashboard.
        gcs_address: ``HOST:PORT`` for ``ray.init(address=...)`` and ``ray start``.
        env: environment for subprocesses (ray CLI, drivers, ``jacpipe``): token
            auth on, this Python's bin first on PATH, ``RAY_API_SERVER_ADDRESS`` set.
        auth_env: only the auth variables (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN_PATH``).
        token_path: the file holding the cluster's auth token (mode 0600).
        temp_dir: the cluster's private ``--temp-dir`` (logs are under it).
        root: the folder this cluster owns under /tmp (temp dir, start logs).
        resources: the custom resource name of each node, head first.
        startup_s: seconds until both nodes were up.
        started_at: ``time.time()`` just before the first ``ray start``.
        pgids: process groups of the two ``ray start`` calls.
        state_dir: where :func:`up` recorded it (None when started otherwise).
    """

    dashboard_url: str
    gcs_address: str
    env: dict[str, str]
    auth_env: dict[str, str]
    token_path: Path
    temp_dir: Path
    root: Path
    resources: tuple[str, ...] = NODE_RESOURCES
    startup_s: float = 0.0
    started_at: float = 0.0
    pgids: list[int] = field(default_factory=list)
    state_dir: Path | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def token(self) -> str:
        """The cluster's auth token (read from ``token_path``)."""
        return self.token_path.read_text().strip()

    def headers(self) -> dict[str, str]:
        """HTTP headers that authenticate against the dashboard."""
        return {"Authorization": f"Bearer {self.token}"}

    def _owns(self, proc: Any) -> bool:
        """Whether a process of one of our groups really is this cluster's.

        A recorded group id could, days later, name an unrelated group (pid
        reuse). Every process ``ray start`` left behind inherited its
        environment, so it carries this cluster's ``RAY_AUTH_TOKEN_PATH``; most
        also name the temp dir on their command line.
        """
        import psutil

        try:
            if proc.create_time() < self.started_at - 1.0:
                return False
            if any(str(self.root) in arg for arg in proc.cmdline()):
                return True
            return proc.environ().get("RAY_AUTH_TOKEN_PATH") == str(self.token_path)
        except psutil.Error:
            return False

    def processes(self) -> list[Any]:
        """Every live process of this cluster (``psutil.Process`` objects)."""
        import psutil

        found: dict[int, Any] = {}
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) in self.pgids and self._owns(proc):
                    found[proc.pid] = proc
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        for proc in list(found.values()):
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        found.pop(os.getpid(), None)
        return list(found.values())

    def listening(self) -> list[tuple[str, str, int]]:
        """``(process name, address, port)`` of every TCP socket this cluster listens on."""
        return listening_sockets({p.pid: _name(p) for p in self.processes()})

    def stop(self, grace_s: float = 3.0, *, remove_files: bool = True) -> int:
        """Kill this cluster's processes only, then delete its folder. Idempotent.

        Returns:
            How many processes were signalled.
        """
        if self._stopped:
            return 0
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
        # Stragglers born during the shutdown: once more, by group and ownership.
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if remove_files:
            shutil.rmtree(self.root, ignore_errors=True)
        return len(procs)

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

    # -- state for `make cluster-down` -----------------------------------------
    def to_state(self) -> dict[str, Any]:
        """JSON facts that :func:`load` needs to find and stop this cluster (no token)."""
        return {
            "dashboard_url": self.dashboard_url,
            "gcs_address": self.gcs_address,
            "token_path": str(self.token_path),
            "temp_dir": str(self.temp_dir),
            "root": str(self.root),
            "resources": list(self.resources),
            "started_at": self.started_at,
            "startup_s": self.startup_s,
            "pgids": list(self.pgids),
        }

    def exports(self) -> str:
        """Shell lines a user sources to talk to this cluster."""
        return (
            f"export RAY_API_SERVER_ADDRESS={self.dashboard_url}\n"
            f"export RAY_AUTH_MODE=token\n"
            f"export RAY_AUTH_TOKEN_PATH={self.token_path}\n"
        )


def _name(proc: Any) -> str:
    """A process's name; for Python, its script (``dashboard.py``, ``monitor.py``)."""
    try:
        name = str(proc.name())
        if name.startswith("python"):
            args = proc.cmdline()[1:]
            if "-m" in args[:-1]:
                return str(args[args.index("-m") + 1])
            scripts = [a for a in args if a.endswith(".py")]
            name = os.path.basename(scripts[0]) if scripts else name
        return name
    except Exception:  # noqa: BLE001 - gone meanwhile
        return "?"


def _proc_net_listeners() -> dict[int, tuple[str, int]]:
    """Listening TCP sockets of this network namespace: ``inode -> (address, port)``."""
    import ipaddress

    found: dict[int, tuple[str, int]] = {}
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if len(cols) < 10 or cols[3] != "0A":  # 0A: LISTEN
                    continue
                hex_addr, hex_port = cols[1].split(":")
                raw = bytes.fromhex(hex_addr)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
                ip = ipaddress.ip_address(raw)
                ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
                found[int(cols[9])] = (str(ip), int(hex_port, 16))
    return found


def listening_sockets(names: dict[int, str]) -> list[tuple[str, str, int]]:
    """``(name, address, port)`` of the listening TCP sockets the processes ``names`` hold."""
    listeners = _proc_net_listeners()
    out = set()
    for pid, name in names.items():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inode = int(link[8:-1])
                        if inode in listeners:
                            out.add((name, *listeners[inode]))
    return sorted(out)


#: What :meth:`LocalCluster.exports` sets; the line that drops them again.
UNSET = "unset RAY_API_SERVER_ADDRESS RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH"
#: A shell function ``env.sh`` defines, so a sourced shell can drop the variables later.
UNSET_HELPER = f"jacpipe_cluster_unset() {{ {UNSET}; }}\n"


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> int:
    """Run ``ray start ARGS`` in a new process group; return that group's id."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", *args],
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
        raise ClusterError(f"`ray start {' '.join(args)}` failed ({code}):\n{tail}")
    return pgid


def _pick_port(wanted: int | None, default: int | None, what: str) -> int:
    if wanted:
        if not _port_free(wanted):
            raise ClusterError(f"{what} port {wanted} on {HOST} is in use: choose another")
        return wanted
    if default and _port_free(default):
        return default
    return free_port()


def start_cluster(
    num_cpus: int = 1,
    *,
    token_path: Path | None = None,
    gcs_port: int | None = None,
    dashboard_port: int | None = None,
    prefer_default_ports: bool = False,
) -> LocalCluster:
    """Start head + one worker node on 127.0.0.1 with token auth; wait until both are up.

    Args:
        num_cpus: CPUs each node advertises.
        token_path: where to write the auth token (default: inside the cluster's
            /tmp folder, deleted by ``stop``).
        gcs_port, dashboard_port: fixed ports (must be free); default: free ports.
        prefer_default_ports: use 6379 / 8265 when they are free (for people).

    Returns:
        The running cluster; call ``stop()`` when done.

    Raises:
        ClusterError: a node did not start (the ``ray start`` output is included).
    """
    root = Path(tempfile.mkdtemp(prefix="jpray-", dir="/tmp"))
    temp_dir = root / "ray"
    token_path = Path(token_path) if token_path else root / TOKEN_FILE
    token_path.parent.mkdir(parents=True, exist_ok=True)
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path.resolve())}

    drop = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    base["PATH"] = str(Path(sys.executable).parent) + os.pathsep + base.get("PATH", "")
    base.update(auth_env)
    base["RAY_USAGE_STATS_ENABLED"] = "0"
    base["PYTHONUNBUFFERED"] = "1"

    gcs = _pick_port(gcs_port, DEFAULT_GCS_PORT if prefer_default_ports else None, "GCS")
    dash = _pick_port(
        dashboard_port, DEFAULT_DASHBOARD_PORT if prefer_default_ports else None, "dashboard"
    )
    gcs_address = f"{HOST}:{gcs}"
    dashboard_url = f"http://{HOST}:{dash}"
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
    # Metrics exporters on free ports, not Ray's fixed defaults (8080 per node,
    # 44217 autoscaler, 44227 dashboard): two clusters on one machine never
    # collide. Where they listen is Ray's choice: see the README's cluster section.
    base["AUTOSCALER_METRIC_PORT"] = str(free_port())
    base["DASHBOARD_METRIC_PORT"] = str(free_port())
    cluster = LocalCluster(
        dashboard_url=dashboard_url,
        gcs_address=gcs_address,
        env={**base, "RAY_API_SERVER_ADDRESS": dashboard_url},
        auth_env=auth_env,
        token_path=token_path.resolve(),
        temp_dir=temp_dir,
        root=root,
        started_at=time.time(),
    )
    started = time.monotonic()
    try:
        head = [
            "--head",
            f"--port={gcs}",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--resources={json.dumps({NODE_RESOURCES[0]: 1})}",
        ]
        cluster.pgids.append(_ray_start(head + common, base, root / "start-head.log"))
        worker = [
            f"--address={gcs_address}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--resources={json.dumps({NODE_RESOURCES[1]: 1})}",
        ]
        cluster.pgids.append(_ray_start(worker + common, base, root / "start-worker.log"))
        deadline = time.monotonic() + START_TIMEOUT_S
        while cluster.nodes_alive() < 2:
            if time.monotonic() > deadline:
                raise ClusterError(f"two-node cluster not up after {START_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        cluster.startup_s = time.monotonic() - started
    except BaseException:
        cluster.stop()
        raise
    return cluster


# ---------------------------------------------------------------------------
# `make cluster-up` / `make cluster-down`: state kept in .cluster/
# ---------------------------------------------------------------------------


def load(state_dir: Path) -> LocalCluster | None:
    """The cluster recorded in ``state_dir``, or None when none is recorded."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        s = json.loads(path.read_text())
        return LocalCluster(
            dashboard_url=s["dashboard_url"],
            gcs_address=s["gcs_address"],
            env={},
            auth_env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": s["token_path"]},
            token_path=Path(s["token_path"]),
            temp_dir=Path(s["temp_dir"]),
            root=Path(s["root"]),
            resources=tuple(s["resources"]),
            startup_s=float(s["startup_s"]),
            started_at=float(s["started_at"]),
            pgids=[int(p) for p in s["pgids"]],
            state_dir=Path(state_dir),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(
            f"{path} is not a cluster state file ({exc!r}); delete {state_dir} by hand "
            "after checking that no cluster of yours is running"
        ) from None


def up(state_dir: Path, *, num_cpus: int = 1, dashboard_port: int | None = None,
       gcs_port: int | None = None) -> LocalCluster:
    """Start the cluster and record it in ``state_dir`` (refuses if one is up)."""
    state_dir = Path(state_dir).resolve()
    old = load(state_dir)
    if old is not None:
        if old.processes():
            raise ClusterError(
                f"a cluster started from here is already up (dashboard {old.dashboard_url}); "
                "run `make cluster-down` first"
            )
        _forget(state_dir, old)
    state_dir.mkdir(parents=True, exist_ok=True)
    cluster = start_cluster(
        num_cpus,
        token_path=state_dir / TOKEN_FILE,
        gcs_port=gcs_port,
        dashboard_port=dashboard_port,
        prefer_default_ports=True,
    )
    cluster.state_dir = state_dir
    (state_dir / STATE_FILE).write_text(json.dumps(cluster.to_state(), indent=1))
    (state_dir / ENV_FILE).write_text(
        cluster.exports() + "# after `make cluster-down`: jacpipe_cluster_unset (or: "
        + UNSET + ")\n" + UNSET_HELPER
    )
    return cluster


def down(state_dir: Path) -> int | None:
    """Stop the cluster recorded in ``state_dir``; None when none is recorded.

    Returns:
        How many processes were signalled.
    """
    state_dir = Path(state_dir).resolve()
    cluster = load(state_dir)
    if cluster is None:
        return None
    count = cluster.stop()
    _forget(state_dir, cluster)
    return count


def _forget(state_dir: Path, cluster: LocalCluster) -> None:
    shutil.rmtree(cluster.root, ignore_errors=True)
    for name in (STATE_FILE, ENV_FILE, TOKEN_FILE):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()
    with contextlib.suppress(OSError):
        state_dir.rmdir()


def main(argv: list[str] | None = None) -> int:
    """``python -m scripts.localcluster up|down|status [--state-dir .cluster]``."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.localcluster",
        description="Start/stop a two-node Ray cluster on 127.0.0.1 with token auth.",
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", default=".cluster", help="where the state is kept")
    parser.add_argument("--num-cpus", type=int, default=1, help="CPUs per node (up)")
    parser.add_argument("--dashboard-port", type=int, default=None, help="default: 8265 if free")
    parser.add_argument("--port", type=int, default=None, help="GCS port; default: 6379 if free")
    args = parser.parse_args(argv)
    state_dir = Path(args.state_dir)
    try:
        if args.action == "up":
            c = up(state_dir, num_cpus=args.num_cpus, dashboard_port=args.dashboard_port,
                   gcs_port=args.port)
            env_file = state_dir.resolve() / ENV_FILE
            print(
                f"two-node Ray cluster up in {c.startup_s:.1f} s ({args.num_cpus} CPU per node)\n"
                f"  dashboard / Jobs API: {c.dashboard_url}\n"
                f"  GCS address:          {c.gcs_address}\n"
                f"  auth token file:      {c.token_path}\n"
                f"  logs:                 {c.temp_dir}/session_latest/logs\n"
                f"To use it, run:  source {env_file}   (or export these)\n"
                + c.exports()
                + "Stop it with:  make cluster-down"
            )
        elif args.action == "down":
            count = down(state_dir)
            if count is None:
                print(f"no cluster recorded in {state_dir}/: nothing to stop")
            else:
                print(f"cluster stopped ({count} processes)\n"
                      f"If you sourced its env.sh, drop its variables (a local `jacpipe run` "
                      f"would otherwise look for the cluster): jacpipe_cluster_unset  (or: "
                      f"{UNSET})")
        else:
            c = load(state_dir)
            if c is None:
                print(f"no cluster recorded in {state_dir}/")
                return 1
            alive = c.nodes_alive()
            print(f"dashboard {c.dashboard_url}: {alive} node(s) alive, "
                  f"{len(c.processes())} processes")
            return 0 if alive else 1
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
