"""``pipeline.runner.ntk``: an eNTK written as rows of a folder, and ``K`` from stored rows."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import pipeline
from pipeline import JacpipeError, Problem
from pipeline.analysis.svd import operator_svd
from pipeline.runner.ntk import NTKShard, shard_sizes
from tests.maths.ntkrefs import images, small_cnn, tutorial_full, tutorial_ntk


def test_rows_of_k_read_back_as_a_matrix_an_operator_and_singular_values(tmp_path):
    net, x1, x2 = small_cnn(), images(5), images(3, seed=2)
    out = tmp_path / "k"
    manifest = pipeline.write_ntk(net, x1, x2, out=str(out), samples_per_shard=2,
                                  executor="local")
    ref = tutorial_full(net, x1, x2).numpy()
    got = pipeline.read_jacobian(out)
    assert got.shape == ref.shape == (15, 9) and len(manifest.plan) == 3
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    facts = manifest.fingerprint["ntk"]
    assert facts["kernel"] == "full" and facts["method"] in ("contraction", "structured")
    v = np.random.default_rng(0).standard_normal(9)
    op = pipeline.open_jacobian(out).as_linear_operator()
    np.testing.assert_allclose(op @ v, ref @ v, rtol=1e-10, atol=1e-10)
    svd = operator_svd(pipeline.open_jacobian(out).as_linear_operator(dtype="float64"), 3)
    np.testing.assert_allclose(svd.s, np.linalg.svd(ref, compute_uv=False)[:3], rtol=1e-8)


def test_a_symmetric_trace_kernel_and_an_occupied_folder(tmp_path):
    net, x = small_cnn(), images(4)
    out = str(tmp_path / "t")
    pipeline.write_ntk(net, x, out=out, kernel="trace", samples_per_shard=3, executor="local",
                       memory_budget="1MiB")  # below this process's baseline: the least room
    ref = tutorial_ntk(net, x, x, "trace").numpy()
    np.testing.assert_allclose(pipeline.read_jacobian(out), ref, rtol=1e-10,
                               atol=1e-10 * np.abs(ref).max())
    with pytest.raises(JacpipeError):
        pipeline.write_ntk(net, x, out=out, kernel="sum", executor="local")
    with pytest.raises(JacpipeError, match="executor must be one of"):
        pipeline.write_ntk(net, x, out=out, kernel="sum", executor="dask", overwrite=True)
    pipeline.write_ntk(net, x, out=out, kernel="sum", overwrite=True, executor="local")
    assert pipeline.read_jacobian(out).shape == (4, 4)


def test_shards_run_as_ray_tasks_and_report_their_processes(ray_session, tmp_path):
    net, x1, x2 = small_cnn(), images(5), images(4, seed=2)
    out = str(tmp_path / "k")
    manifest = pipeline.write_ntk(net, x1, x2, out=out, kernel="trace", executor="ray",
                                  samples_per_shard=2, memory_budget="1GiB")
    ref = tutorial_ntk(net, x1, x2, "trace").numpy()
    np.testing.assert_allclose(pipeline.read_jacobian(out), ref, rtol=1e-10,
                               atol=1e-10 * np.abs(ref).max())
    assert manifest.fingerprint["ntk"]["executor"] == "ray" and len(manifest.plan) == 3
    entries = pipeline.open_jacobian(out).committed
    assert all(e.pid not in (None, os.getpid()) and e.peak_rss > 0 for e in entries)


def test_little_room_gives_blocks_of_one_sample_and_row_blocks_of_two(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.runner.ntk.MIN_ROOM", 8 * 2 * (3 * 12 * 8))  # 2 rows of K
    net, x1, x2 = small_cnn(), images(5), images(4, seed=2)
    out = str(tmp_path / "k")
    manifest = pipeline.write_ntk(net, x1, x2, out=out, executor="local", memory_budget=1,
                                  samples_per_shard=3)
    ref = tutorial_full(net, x1, x2).numpy()
    np.testing.assert_allclose(pipeline.read_jacobian(out), ref, rtol=1e-10, atol=1e-12)
    assert [e.chunk_size for e in manifest.committed] == [1, 1]


def test_blocks_are_sized_from_the_room_the_budget_leaves():
    shard = NTKShard(0, 0, 1000, "o", "r", "full", "structured", per=10, n=50_000,
                     dtype="float32", kept_bytes=40_000, sample_bytes=800_000, pair_bytes=4_000,
                     memory_budget=2**30)
    room = 400 * 2**20
    rows, block = shard_sizes(shard, room, 5_000)
    assert rows * 10 * 50_000 * 4 <= room // 8 < (rows + 1) * 10 * 50_000 * 4
    assert block * 840_000 <= room // 4 and block**2 * 4_000 <= room // 8
    assert (block + 1) * 840_000 > room // 4 or (block + 1) ** 2 * 4_000 > room // 8
    assert shard_sizes(shard, -5, 5_000) == shard_sizes(shard, 16 * 2**20, 5_000)  # least room


def _stored(tmp_path, name, net, x, shards=2):
    out = str(tmp_path / name)
    pipeline.run(Problem.from_module(net, x), out=out, shards=shards, executor="local",
                 progress=False, echo=lambda _: None)
    return out


def test_ntk_from_stored_rows_equals_ntk_and_the_tutorial(tmp_path, monkeypatch):
    net, x1, x2 = small_cnn(), images(5), images(3, seed=2)
    j1, j2 = _stored(tmp_path, "j1", net, x1, 3), _stored(tmp_path, "j2", net, x2)
    monkeypatch.setattr("pipeline.runner.ntk.MIN_ROOM", 20_000 * 8)  # blocks of one sample
    for budget in (2**40, 1):
        got = pipeline.ntk_from(j1, j2, model=net, memory_budget=budget)
        np.testing.assert_allclose(got, pipeline.ntk(net, x1, x2), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got, tutorial_full(net, x1, x2), rtol=1e-10, atol=1e-12)
        trace = pipeline.ntk_from(j1, kernel="trace", memory_budget=budget)  # symmetric
        np.testing.assert_allclose(trace, tutorial_ntk(net, x1, x1, "trace"), rtol=1e-10,
                                   atol=1e-12)
    opened = pipeline.open_jacobian(j1)
    np.testing.assert_allclose(pipeline.ntk_from(opened, opened, kernel="sum"),
                               pipeline.ntk(net, x1, kernel="sum"), rtol=1e-10, atol=1e-12)
    assert got.dtype == torch.float64 and got.shape == (15, 9)


def test_ntk_from_writes_rows_of_k_as_a_folder(tmp_path, monkeypatch):
    net, x1, x2 = small_cnn(), images(4), images(3, seed=2)
    j1, j2 = _stored(tmp_path, "j1", net, x1), _stored(tmp_path, "j2", net, x2)
    out = str(tmp_path / "k")
    monkeypatch.setattr("pipeline.runner.ntk.MIN_ROOM", 20_000 * 8)  # blocks of one sample
    manifest = pipeline.ntk_from(j1, j2, out=out, memory_budget=1)
    assert len(manifest.plan) == 4 and manifest.fingerprint["ntk"]["method"] == "stored"
    ref = tutorial_full(net, x1, x2).numpy()
    np.testing.assert_allclose(pipeline.read_jacobian(out), ref, rtol=1e-10, atol=1e-12)
    assert manifest.fingerprint["parameters"] == (
        pipeline.open_jacobian(j1).manifest.fingerprint["parameters"])


def test_ntk_from_refuses_other_parameters_and_other_results(tmp_path):
    net, x = small_cnn(), images(3)
    stored = _stored(tmp_path, "j", net, x)
    changed = small_cnn(seed=1)
    with pytest.raises(JacpipeError, match="other parameters than the model's"):
        pipeline.ntk_from(stored, model=changed)
    with pytest.raises(JacpipeError, match="Jacobians of other parameters"):
        pipeline.ntk_from(stored, _stored(tmp_path, "other", changed, x))
    plain = str(tmp_path / "plain")
    pipeline.run(Problem(fn=torch.tanh, x=torch.ones(3, dtype=torch.float64)), out=plain,
                 executor="local", progress=False, echo=lambda _: None)
    with pytest.raises(JacpipeError, match="expected parameter Jacobians"):
        pipeline.ntk_from(plain)
    with pytest.raises(JacpipeError, match="kernel must be one of"):
        pipeline.ntk_from(stored, kernel="diag")
