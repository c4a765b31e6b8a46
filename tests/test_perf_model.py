"""The performance model: cost-based method choice, memory-budgeted chunks, engine fast paths."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import JacpipeError
from pipeline.maths import engine
from pipeline.runner.plan import (
    CACHE_BYTES,
    MIN_CHUNK,
    SAFETY,
    WRITER_BYTES,
    choose_method,
    chunk_rows,
    group_rows,
    plan_shards,
)


def _mlp(n: int, m: int, h: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(h, n, generator=g, dtype=dtype) / n**0.5
    w2 = torch.randn(m, h, generator=g, dtype=dtype) / h**0.5
    return (lambda v: w2 @ torch.tanh(w1 @ v)), torch.randn(n, generator=g, dtype=dtype)


# -- the cost model -----------------------------------------------------------


@pytest.mark.parametrize("m,n,expected", [
    (50_000, 16, "fwd"),    # tall: 16 JVPs per shard beat 50,000 VJPs
    (2000, 2000, "rev"),    # square: reverse (one recorded forward, vmapped pullback)
    (40_000, 40_000, "rev"),
    (100, 4000, "rev"),     # wide
    (4000, 1000, "rev"),    # tall-ish, but n * shards is not far below m
])
def test_auto_method_with_the_default_plan(m, n, expected):
    shards, _ = plan_shards(m, row_bytes=n * 4, workers=2)
    assert choose_method("auto", m=m, n=n, shards=len(shards)) == expected


def test_forward_mode_loses_when_every_shard_redoes_all_columns():
    # fwd costs n JVPs per shard: many shards tip a tall problem back to rev.
    assert choose_method("auto", m=50_000, n=16, shards=4) == "fwd"
    assert choose_method("auto", m=50_000, n=16, shards=2000) == "rev"


# -- the memory model -----------------------------------------------------------


def test_intermediates_count_per_row_memory_not_saved_weights():
    n, m, h = 300, 200, 64
    fn, x = _mlp(n, m, h)
    # x.reshape (n), w1 @ v (h), tanh (h), w2 @ . (m): what one cotangent row carries.
    assert engine.intermediate_numel(fn, x) == n + 2 * h + m
    # autograd saves both weights: counting those per row would be ~150x too many.
    assert engine.intermediate_numel(fn, x) * 50 < 2 * n * h


def test_chunk_rows_keeps_the_pass_inside_the_budget():
    kw = dict(baseline=600 * 2**20, m=40_000, n=40_000, activations=81_536, itemsize=4,
              group_bytes=2 * group_rows(40_000, 4) * 40_000 * 4)
    c = chunk_rows(budget=2**30, cache_bytes=None, **kw)
    per = 4 * (80_000 + 81_536) * SAFETY
    free = 2**30 - kw["baseline"] - kw["group_bytes"] - WRITER_BYTES
    assert c * per <= free < (c + 1) * per
    # the cache cap only ever lowers it, and never below MIN_CHUNK by itself
    assert chunk_rows(budget=2**30, **kw) == min(c, max(MIN_CHUNK, CACHE_BYTES // (per / SAFETY)))
    with pytest.raises(JacpipeError, match="too small"):
        chunk_rows(budget=kw["baseline"] + kw["group_bytes"] + WRITER_BYTES, **kw)


def test_chunk_rows_caps_the_working_set_of_elementwise_problems():
    # heat N=64 float64: ~90k intermediate elements per row; all 4096 rows at
    # once stream 3 GB through memory, ~170 rows fit the cache target.
    kw = dict(budget=8 * 2**30, baseline=2**29, m=4096, n=4096, activations=90_632,
              itemsize=8, group_bytes=0)
    assert chunk_rows(cache_bytes=None, **kw) > 4096
    assert 100 < chunk_rows(**kw) < 256


def test_forward_mode_budget_counts_the_rows_it_keeps():
    kw = dict(budget=2**30, baseline=2**28, m=10**6, n=64, activations=10**6, itemsize=4,
              group_bytes=0, method="fwd", cache_bytes=None)
    assert chunk_rows(rows=10**6, **kw) < chunk_rows(rows=0, **kw)
    with pytest.raises(JacpipeError, match="too small"):
        chunk_rows(rows=4 * 10**6, **kw)  # the shard's (rows, n) result alone is over budget


# -- engine fast paths ------------------------------------------------------------


def test_forward_mode_runs_no_extra_forward_pass():
    fn, x = _mlp(8, 50, 16)
    calls = 0

    def counted(v):
        nonlocal calls
        calls += 1
        return fn(v)

    rows = engine.jacobian_rows(counted, x, 10, 40, method="fwd")
    assert calls == 1  # one vmapped JVP pass over all 8 columns, nothing else
    torch.testing.assert_close(rows, torch.func.jacfwd(fn)(x)[10:40])


def test_forward_mode_checks_the_range_and_allows_empty_ones():
    fn, x = _mlp(4, 6, 3)
    assert engine.jacobian_rows(fn, x, 3, 3, method="fwd").shape == (0, 4)
    with pytest.raises(ValueError, match="outside"):
        engine.jacobian_rows(fn, x, 0, 7, method="fwd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_rows_keep_the_blocks_layout_and_values(dtype):
    fn, x = _mlp(40, 30, 8, dtype)
    ref = torch.func.jacrev(fn)(x)
    one = engine.jacobian_rows(fn, x, 0, 30)
    chunked = engine.jacobian_rows(fn, x, 0, 30, chunk_size=7)
    torch.testing.assert_close(one, ref)
    torch.testing.assert_close(chunked, ref)
    # `w @ v` layers give column-major blocks; the result keeps that order
    # instead of transposing every block (as torch.cat would).
    assert one.stride() == chunked.stride() == (1, 30)
    sub = engine.jacobian_rows(fn, x, 5, 23, chunk_size=4)
    torch.testing.assert_close(sub, ref[5:23])


def test_row_major_blocks_give_a_row_major_result():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 9, generator=g)
    fn = lambda v: torch.nn.functional.linear(torch.sin(v), w)  # noqa: E731
    x = torch.randn(9, generator=g)
    out = engine.jacobian_rows(fn, x, 0, 12, chunk_size=5)
    assert out.is_contiguous()
    torch.testing.assert_close(out, torch.func.jacrev(fn)(x))


# -- shards -----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_default_plans_are_whole_rounds_of_workers(workers):
    # 1.3 GB of rows would be 5 parts of <= 256 MiB: round up to whole rounds.
    plan, _ = plan_shards(18_000, row_bytes=18_000 * 4, workers=workers)
    assert len(plan) % workers == 0 and len(plan) >= 5
    assert all(s.rows * 18_000 * 4 <= 256 * 2**20 for s in plan)
