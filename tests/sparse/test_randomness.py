"""``pipeline.sparse.randomness``: the random-op watch without SciPy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_FRESH = r"""
import json, sys
import torch
from pipeline.core.errors import JacpipeError
from pipeline.sparse.randomness import refuse_random_ops
x = torch.randn(5, dtype=torch.float64)
refuse_random_ops(lambda t: t.sin() * 2, x, "job")
try:
    refuse_random_ops(lambda t: t * torch.rand_like(t), x, "job")
    refused = None
except JacpipeError as exc:
    refused = str(exc)
print(json.dumps({"scipy": "scipy" in sys.modules, "refused": refused}))
"""


@pytest.mark.slow
def test_the_random_op_watch_needs_no_scipy():
    """A dense job's random-op refusal (before every shard) imports no SciPy (0.2-0.7 s)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["refused"] is not None and "random op" in doc["refused"]
    assert doc["scipy"] is False


def test_the_names_stay_where_they_were():
    from pipeline.sparse import detect, randomness, rules

    assert detect.refuse_random_ops is randomness.refuse_random_ops
    assert rules.is_random is randomness.is_random and rules.RANDOM is randomness.RANDOM
    assert rules.draws_random is randomness.draws_random and rules.op_name is randomness.op_name
