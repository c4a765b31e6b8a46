"""Shard planning, memory sizes, chunk sizes and the cost model."""

from __future__ import annotations

import pytest

from pipeline.errors import JacpipeError
from pipeline.plan import choose_method, chunk_rows, parse_size, plan_shards


@pytest.mark.parametrize("total,shards", [(10, 3), (2000, 8), (7, 7), (1000, 6), (5, 1)])
def test_shards_cover_every_row_exactly_once(total, shards):
    plan, note = plan_shards(total, shards=shards)
    assert note is None
    assert len(plan) == shards
    rows = [r for s in plan for r in range(s.start, s.stop)]
    assert rows == list(range(total))
    sizes = [s.rows for s in plan]
    assert max(sizes) - min(sizes) <= 1
    assert [s.index for s in plan] == list(range(shards))
    assert plan[0].file == "part-00000.parquet"


def test_rows_per_shard_gives_uneven_last_shard():
    plan, _ = plan_shards(10, rows_per_shard=4)
    assert [(s.start, s.stop) for s in plan] == [(0, 4), (4, 8), (8, 10)]


def test_more_shards_than_rows_is_clamped_with_a_note():
    plan, note = plan_shards(5, shards=9)
    assert len(plan) == 5 and "5 shards" in note


@pytest.mark.parametrize("kwargs,match", [
    ({"shards": 0}, "at least 1"),
    ({"rows_per_shard": 0}, "at least 1"),
    ({"shards": 2, "rows_per_shard": 3}, "not both"),
])
def test_bad_shard_requests(kwargs, match):
    with pytest.raises(JacpipeError, match=match):
        plan_shards(10, **kwargs)


def test_default_plan_splits_big_results_into_bounded_parts():
    plan, _ = plan_shards(40_000, row_bytes=40_000 * 4, workers=2)
    assert all(s.rows * 40_000 * 4 <= 256 * 2**20 for s in plan)
    plan, _ = plan_shards(100, row_bytes=8, workers=2)
    assert len(plan) == 4


def test_batched_plans_align_to_whole_samples():
    plan, _ = plan_shards(12 * 100, shards=7, align=12)
    assert all(s.start % 12 == 0 for s in plan)
    assert plan[-1].stop == 1200


@pytest.mark.parametrize("text,value", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20),
                                        ("1.5G", 1_500_000_000), ("1000", 1000), ("64kb", 64_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "0", "3 parsecs"])
def test_parse_size_rejects(text):
    with pytest.raises(JacpipeError):
        parse_size(text)


def test_chunk_rows_scales_with_budget_and_refuses_too_small():
    kw = dict(baseline=100 * 2**20, m=40_000, n=40_000, activations=1024, itemsize=4,
              group_bytes=32 * 2**20)
    small = chunk_rows(budget=300 * 2**20, **kw)
    big = chunk_rows(budget=1200 * 2**20, **kw)
    assert 1 <= small < big
    per = 4 * (40_000 * 2 + 1024) * 2.0
    assert big * per <= 1200 * 2**20 - 132 * 2**20
    with pytest.raises(JacpipeError, match="too small"):
        chunk_rows(budget=120 * 2**20, **kw)


def test_cost_model_picks_forward_mode_for_tall_jacobians_only():
    assert choose_method("auto", m=50_000, n=16, shards=8) == "fwd"
    assert choose_method("auto", m=2000, n=2000, shards=8) == "rev"
    assert choose_method("auto", m=100, n=4000, shards=2) == "rev"
    assert choose_method("fwd", m=10, n=10_000, shards=4) == "fwd"
    with pytest.raises(JacpipeError, match="auto, rev or fwd"):
        choose_method("sideways", m=1, n=1, shards=1)
