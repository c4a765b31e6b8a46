"""One Ray for the whole session (Ray's own `ray_start_regular_shared` pattern)."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.cluster", "tests.s3server"]

# Workers must find `tests.userjobs`: Ray puts the driver's cwd on their path.
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The suite tests the Ray path (workers, retries, GPUs, kills) unless a test
# asks for the in-process executor: `--executor auto` would run its small jobs
# in the test process (tests/test_executor.py covers auto and local).
os.environ.setdefault("JACPIPE_EXECUTOR", "ray")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
