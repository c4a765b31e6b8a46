"""Shard planning, memory sizes, chunk sizes and the cost model."""

from __future__ import annotations

import pytest

from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions, parse_size
from pipeline.core.shapes import Shapes
from pipeline.runner.plan import Resources, choose_method, chunk_rows, make_plan, plan_shards
from pipeline.store.parts import part_name


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
    assert part_name(plan[0].index) == "part-00000.parquet"


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


# ---------------------------------------------------------------------------
# make_plan: every decision of a run, without Ray (issue 11)
# ---------------------------------------------------------------------------


CPU2 = Resources(cpus=2, node_memory=8 * 2**30, node_cpus=2)
GPU2 = Resources(cpus=2, gpus=2, node_memory=8 * 2**30, node_cpus=2, node_gpus=2)


def _shapes(m: int = 48, n: int = 40, kind: str = "jacobian", batch: int | None = None):
    return Shapes(kind, (n,), (m,), batch, "float32")


def test_make_plan_cpu_defaults():
    plan = make_plan(_shapes(), RunOptions(job="mlp"), CPU2)
    assert plan.slots == 2 and plan.gpus_per_shard == 0.0 and plan.device == "cpu"
    assert plan.method == "rev" and plan.layout == "dense" and plan.coloring is None
    assert [r for s in plan.shards for r in range(s.start, s.stop)] == list(range(48))
    assert len(plan.shards) % plan.slots == 0  # whole rounds of slots
    assert plan.memory_budget == 8 * 2**30 // 4  # half the node over two slots
    assert plan.threads == 1


def test_make_plan_picks_forward_mode_for_tall_jacobians_and_rev_for_batched_samples():
    assert make_plan(_shapes(m=50_000, n=16), RunOptions(job="j"), CPU2).method == "fwd"
    per_sample = _shapes(m=3, n=6, kind="batched", batch=100)
    plan = make_plan(per_sample, RunOptions(job="j"), CPU2)
    assert plan.method == "rev"  # per sample: 3 VJPs beat 6 JVPs
    assert all(s.start % 3 == 0 for s in plan.shards)  # whole samples per shard


def test_make_plan_gpu_rules_without_ray():
    opts = RunOptions(job="mlp")
    plan = make_plan(_shapes(), opts, GPU2, device_param=True)
    assert plan.gpus_per_shard == 1.0 and plan.device == "auto" and plan.slots == 2
    # a job that cannot build on a GPU gets none by default
    assert make_plan(_shapes(), opts, GPU2, device_param=False).gpus_per_shard == 0.0
    half = make_plan(_shapes(), RunOptions(job="mlp", gpus_per_shard=0.5), GPU2,
                     device_param=True)
    assert half.gpus_per_shard == 0.5 and half.slots == 2
    cases = [
        (RunOptions(job="mlp", gpus_per_shard=3), GPU2, "the cluster has 2 GPUs"),
        (RunOptions(job="mlp", gpus_per_shard=1.5), GPU2, "fractions of one GPU"),
        (RunOptions(job="mlp", device="cuda"), CPU2, "the Ray cluster has no GPUs"),
        (RunOptions(job="mlp", device="cuda", gpus_per_shard=0), GPU2,
         "--device cuda with --gpus-per-shard 0"),
        (RunOptions(job="mlp", cpus_per_shard=3), CPU2, "the cluster has 2 CPUs"),
    ]
    for opts, res, match in cases:
        with pytest.raises(JacpipeError, match=match):
            make_plan(_shapes(), opts, res, device_param=True)
    with pytest.raises(JacpipeError, match="no `device` parameter"):
        make_plan(_shapes(), RunOptions(job="heat", gpus_per_shard=1), GPU2)
    two_nodes = Resources(cpus=4, gpus=2, node_memory=2**33, node_cpus=2, node_gpus=1)
    with pytest.raises(JacpipeError, match="no node has that many"):
        make_plan(_shapes(), RunOptions(job="mlp", gpus_per_shard=2), two_nodes,
                  device_param=True)


def test_make_plan_sparse_with_a_pattern():
    from pipeline.sparse.compressed import banded_pattern

    pattern = banded_pattern(40, 3)
    plan = make_plan(_shapes(m=40, n=40), RunOptions(job="banded"), CPU2, pattern=pattern)
    assert plan.method == plan.layout == "sparse" and plan.coloring.num_colors == 3
    assert len(plan.shards) == plan.slots  # one sparse shard per slot
    facts = plan.coloring_facts()
    assert facts["nnz"] == pattern.nnz and len(facts["pattern_sha256"]) == 64
    dense = make_plan(_shapes(m=40, n=40), RunOptions(job="banded", method="rev"), CPU2,
                      pattern=None)
    assert dense.layout == "dense" and dense.coloring_facts() is None


def test_run_options_check_refuses_bad_values_before_anything_starts():
    for opts, match in [
        (RunOptions(job="j", method="bogus"), "--method must be auto, rev or fwd"),
        (RunOptions(job="j", device="tpu"), "--device must be auto, cpu or cuda"),
        (RunOptions(job="j", dtype="float16"), "--dtype must be float32 or float64"),
        (RunOptions(job="j", chunk_size=0), "--chunk-size must be at least 1"),
        (RunOptions(job="j", memory_budget="lots"), "memory size 'lots'"),
    ]:
        with pytest.raises(JacpipeError, match=match):
            opts.check()


def test_forward_mode_chunks_reserve_the_rows_they_keep():
    """Issue 11, item 7: the worker passes the shard's rows, so fwd chunks shrink with them."""
    from pipeline.core.shard import ShardSpec
    from pipeline.runner.worker import _chunk

    shapes = Shapes("jacobian", (2000,), (200_000,), None, "float64")
    spec = dict(job="j", params={}, fingerprint={}, shapes=shapes, index=0, start=0, out="o",
                method="fwd", layout="dense", memory_budget=2**30, threads=1, device="cpu",
                device_param=False, run_id="r", group_rows=64)
    small = _chunk(ShardSpec(stop=100, **spec), activations=0, pattern=None, baseline=0)
    big = _chunk(ShardSpec(stop=50_000, **spec), activations=0, pattern=None, baseline=0)
    assert big < small  # 50,000 kept rows of 2000 float64 = 800 MB of the 1 GiB budget
    with pytest.raises(JacpipeError, match="too small"):
        _chunk(ShardSpec(stop=100_000, **spec), activations=0, pattern=None, baseline=0)
