"""``pipeline.sparse.randomness``: the random-op watch without SciPy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.core.errors import JacpipeError, SparsityError
from pipeline.sparse.coloring import Coloring, row_coloring
from pipeline.sparse.compressed import sparse_jacobian_rows
from pipeline.sparse.detect import detect_sparsity
from pipeline.sparse.randomness import draws_random, refuse_random_ops

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


def _attention(p: float, training: bool = True):
    """Self-attention over (L=3, N=2, E=4) in float64: a ``torch.nn.MultiheadAttention`` in
    ``training`` mode with dropout ``p``."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(4, 2, dropout=p, dtype=torch.float64).train(training)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return mha(t, t, t, need_weights=False)[0].reshape(-1)

    return fn, torch.randn(3, 2, 4, dtype=torch.float64)


def test_attention_in_training_without_dropout_is_accepted_and_exact():
    """dropout_p=0 in training draws nothing (eager skips the draw; the fused kernel and
    dropout's decomposition are tagged random for it alone): the watch and detection
    accept it, and the sparse Jacobian on the detected pattern is torch's."""
    fn, x = _attention(0.0)
    refuse_random_ops(fn, x, "job")
    pattern = detect_sparsity(fn, x)
    want = torch.autograd.functional.jacobian(fn, x).reshape(24, 24)
    assert np.all(pattern.toarray()[want.abs().numpy() > 0])
    colors = row_coloring(pattern)  # reverse: the CPU attention kernel has no forward AD
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop")  # torch's vmap fallback
        rows = sparse_jacobian_rows(fn, x, 0, 24, pattern,
                                    Coloring(colors, int(colors.max()) + 1, "rev"),
                                    compile="off")
    torch.testing.assert_close(rows.to_dense(24), want, rtol=1e-12, atol=1e-12)
    drop = lambda t: F.dropout(t, p=0.0, training=True) * t  # noqa: E731
    refuse_random_ops(drop, x, "job")
    assert detect_sparsity(drop, x).nnz == 24


def test_attention_dropout_in_training_is_still_refused_on_every_path():
    fn, x = _attention(0.5)
    with pytest.raises(JacpipeError, match="random op"):
        refuse_random_ops(fn, x, "job")
    for mode in ("global", "local"):
        with pytest.raises(SparsityError, match="random op"):
            detect_sparsity(fn, x, mode=mode)
    fn, x = _attention(0.5, training=False)  # eval: no dropout, accepted
    refuse_random_ops(fn, x, "job")
    assert detect_sparsity(fn, x).shape == (24, 24)


def test_a_draw_seeded_inside_fn_is_deterministic_but_not_detected():
    """op_db's training multi_head_attention_forward samples: fn seeds its own generator, so
    its dropout mask is the same every call (the watch accepts it, its Jacobian is the same
    twice), but detection refuses every draw it traces (the seed is not in the trace)."""
    fn, x = _attention(0.5)

    def seeded(t: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng():
            torch.manual_seed(42)
            return fn(t)

    torch.manual_seed(1)
    first = torch.autograd.functional.jacobian(seeded, x)
    torch.manual_seed(2)
    assert torch.equal(first, torch.autograd.functional.jacobian(seeded, x))
    assert not torch.equal(fn(x), fn(x))  # unseeded, the mask changes
    refuse_random_ops(seeded, x, "job")
    with pytest.raises(SparsityError, match="random op"):
        detect_sparsity(seeded, x)


def test_eager_dropout_ops_draw_exactly_when_they_can_drop():
    """Eager CPU dropout draws with ``bernoulli_(1 - p)`` (ATen's ``_dropout``); a draw
    whose result is fixed (p in {0, 1}, ``train=False``, ``dropout_p=0``) is not one."""
    x = torch.ones(3, dtype=torch.float64)
    aten = torch.ops.aten
    assert draws_random(aten.bernoulli_.float, (x, 0.5))
    assert not draws_random(aten.bernoulli_.float, (x, 1.0))
    assert draws_random(aten.dropout.default, (x, 0.5, True))
    assert not draws_random(aten.dropout.default, (x, 0.0, True))
    assert not draws_random(aten.dropout.default, (x, 1.0, True))
    assert not draws_random(aten.dropout.default, (x, 0.5, False))
    assert draws_random(aten.native_dropout.default, (x, 0.5, True))
    assert not draws_random(aten.native_dropout.default, (x, 0.0, True))
    assert draws_random(aten.rand_like.default, (x,))
