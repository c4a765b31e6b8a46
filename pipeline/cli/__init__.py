"""The ``jacpipe`` command line (Typer); the logic lives in the layers below.

NOTE: [OpenMP threads that sleep]
    libgomp's threads spin while they wait for work (``OMP_WAIT_POLICY``'s
    default). On a machine whose cores are busy with other work, two torch
    threads then wait for each other at every parallel region: measured on 2
    cores at load 3-6, ``torch.func.jacrev`` of a 100 x 100 map took 36-40 ms
    instead of 0.6 ms, and a sparse heat evaluation 174-296 ms instead of
    7.6 ms; on a quiet machine the two policies measured the same
    (``python -m benchmarks.frontdoor --closure-only``). The command sets
    ``PASSIVE`` unless the variable is set, before torch is imported; Ray's
    workers inherit it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.cli.app import app as app  # noqa: E402 - after the OpenMP policy
from pipeline.cli.app import main as main  # noqa: E402
