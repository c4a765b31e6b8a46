"""One Ray for the whole session (Ray's own `ray_start_regular_shared` pattern)."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.cluster", "tests.s3server"]

# Workers must find `tests.userjobs`: Ray puts the driver's cwd on their path.
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
