"""``pipeline.runner.plan``: shards, methods and the memory model."""

from __future__ import annotations

import pytest

from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions
from pipeline.core.shapes import Shapes
from pipeline.runner.plan import (
    CACHE_BYTES,
    MIN_CHUNK,
    SAFETY,
    WRITER_BYTES,
    Resources,
    choose_method,
    chunk_rows,
    group_rows,
    make_plan,
    plan_shards,
)
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


def test_a_sparse_plan_leaves_forward_mode_where_it_disagrees():
    """Issue 25: a column colouring becomes a row colouring, a Hessian's products reverse."""
    from pipeline.sparse.coloring import validate_coloring
    from pipeline.sparse.compressed import banded_pattern

    pattern = banded_pattern(40, 3)
    agree = make_plan(_shapes(m=40, n=40), RunOptions(job="j"), CPU2, pattern=pattern)
    assert agree.coloring.mode == "fwd" and agree.forward == "fallback"
    why = "forward and reverse mode give different derivatives: ..."
    plan = make_plan(_shapes(m=40, n=40), RunOptions(job="j"), CPU2, pattern=pattern,
                     forward_disagrees=why)
    assert plan.coloring.mode == "rev" and plan.forward == "reverse"
    validate_coloring(pattern, plan.coloring)  # every entry recoverable by rows
    assert f"row colouring (reverse mode), not column colouring (forward mode): {why}" in \
        plan.notes
    hess = make_plan(_shapes(m=40, n=40, kind="hessian"), RunOptions(job="j"), CPU2,
                     pattern=pattern, forward_disagrees=why)
    assert hess.coloring.mode == "symmetric" and hess.forward == "reverse"
    assert any(n.startswith("Hessian-vector products by reverse-over-reverse") for n in
               hess.notes)
    explicit = make_plan(_shapes(m=50_000, n=16), RunOptions(job="j", method="fwd"), CPU2,
                         forward_disagrees=why)
    assert explicit.method == "fwd" and explicit.forward == "warn"
    unbatched = make_plan(_shapes(), RunOptions(job="j"), CPU2, vectorise=False)
    assert not unbatched.vectorise
    assert any(n.startswith("warning: vectorised rows differ") for n in unbatched.notes)


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


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_default_plans_are_whole_rounds_of_workers(workers):
    # 1.3 GB of rows would be 5 parts of <= 256 MiB: round up to whole rounds.
    plan, _ = plan_shards(18_000, row_bytes=18_000 * 4, workers=workers)
    assert len(plan) % workers == 0 and len(plan) >= 5
    assert all(s.rows * 18_000 * 4 <= 256 * 2**20 for s in plan)


def test_compression_option_is_checked_and_planned():
    from pipeline.core.errors import JacpipeError
    from pipeline.core.options import RunOptions
    from pipeline.core.shapes import Shapes
    from pipeline.runner.plan import Resources, make_plan, parse_compression

    assert parse_compression("zstd") == ("zstd", None)
    assert parse_compression("zstd:3") == ("zstd", 3)
    for bad in ("brotli", "lz4:3", "zstd:x", "zstd:99"):
        with pytest.raises(JacpipeError, match="--compression"):
            RunOptions(job="j", compression=bad).check()
    shapes = Shapes("jacobian", (10,), (10,), None, "float32")
    plan = make_plan(shapes, RunOptions(job="j", compression="lz4"),
                     Resources(cpus=2, node_memory=8 * 2**30, node_cpus=2))
    assert plan.compression == "lz4"
