"""A real two-node Ray cluster on this machine, for tests marked ``cluster``.

Register with ``pytest_plugins = ["tests.cluster"]`` in ``conftest.py``.

The cluster logic lives in :mod:`scripts.localcluster` (also behind
``make cluster-up``): two ``ray start`` nodes on 127.0.0.1 sharing one private
``--temp-dir``, token authentication on with a private token file (``~/.ray`` is
not touched), one custom resource per node. Teardown never uses ``ray stop``
(it kills *every* Ray process on the machine, other test sessions included): it
signals only this cluster's process groups and their descendants.
"""

from __future__ import annotations

import atexit
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.localcluster import HOST, NODE_RESOURCES, LocalCluster, down, free_port, up

__all__ = ["HOST", "NODE_RESOURCES", "RayCluster", "ray_cluster", "start_cluster"]

#: The handle tests get: ``dashboard_url``, ``gcs_address``, ``env``, ``auth_env``,
#: ``token``, ``token_path``, ``temp_dir``, ``resources``, ``startup_s``,
#: ``state_dir``, ``headers()``, ``processes()``, ``nodes_alive()``, ``stop()``.
RayCluster = LocalCluster


def start_cluster(num_cpus: int = 1) -> RayCluster:
    """``make cluster-up``'s code path with a private state dir and free ports.

    The state dir is ``cluster.state_dir``; the cluster is stopped (like
    ``make cluster-down``) at exit at the latest.
    """
    state_dir = Path(tempfile.mkdtemp(prefix="jpstate-", dir="/tmp"))
    cluster = up(state_dir, num_cpus=num_cpus, dashboard_port=free_port(), gcs_port=free_port())
    atexit.register(down, state_dir)
    return cluster


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """A two-node Ray cluster on 127.0.0.1 with token auth, torn down at session end."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        down(cluster.state_dir)
        cluster.stop()  # a no-op after down(); kept for a state dir removed by hand


@pytest.fixture
def cluster(ray_cluster: RayCluster, monkeypatch: pytest.MonkeyPatch) -> RayCluster:
    """The session cluster, its token in this process's environment only (like
    ``source .cluster/env.sh``), and no other Ray address or token inherited."""
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for key, value in ray_cluster.auth_env.items():
        monkeypatch.setenv(key, value)
    return ray_cluster


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``cluster`` marker."""
    config.addinivalue_line(
        "markers", "cluster: needs a real two-node Ray cluster started by `ray start` (slow)"
    )
