"""One Ray for the whole session (Ray's own `ray_start_regular_shared` pattern).

Tests mirror the library: ``tests/<layer>/test_<module>.py``; a layer's own
fixtures live in ``tests/<layer>/conftest.py``, the shared ones here and in the
plugins below. A test that starts Ray, a cluster or an S3 server (it asks for
one of :data:`SLOW_FIXTURES`) is marked ``slow``, as are the slow in-process
ones (``@pytest.mark.slow``): ``make test-fast`` runs the rest.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.cluster", "tests.s3server", "tests.dashboard", "tests.faultruns"]

# Workers must find `tests.userjobs`: Ray puts the driver's cwd on their path.
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The suite tests the Ray path (workers, retries, GPUs, kills) unless a test
# asks for the in-process executor: `--executor auto` would run its small jobs
# in the test process (tests/runner/test_driver.py covers auto and local).
os.environ.setdefault("JACPIPE_EXECUTOR", "ray")

#: Fixtures that start Ray, a real cluster or the S3 server (directly or through
#: another fixture): a test that asks for one is ``slow``.
SLOW_FIXTURES = frozenset({"ray_session", "ray_cluster", "cluster", "s3_server",
                           "_moto_endpoint"})


@pytest.fixture(scope="session", autouse=True)
def _submissions_recorded_outside_home(tmp_path_factory):
    """``jacpipe submit`` records its ids (for completion) under a temporary XDG_STATE_HOME."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from pipeline.runner.cluster import embedded_running, shutdown

    if embedded_running():
        shutdown()  # an embedded Ray kept by an earlier test's run: the session starts its own
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test whose fixtures start Ray, a cluster or S3."""
    del config
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
