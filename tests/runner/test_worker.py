"""``pipeline.runner.worker``: one shard: devices, writer threads, non-finite counts."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import JacpipeError
from pipeline.problem.problem import build_problem
from pipeline.runner import worker
from pipeline.runner.worker import compute_shard
from pipeline.store.parts import PartWriter, dense_schema
from pipeline.store.reader import read_jacobian
from pipeline.store.storage import Storage
from tests.faultruns import invoke, manifest
from tests.runner.shards import MLP, _finish, _specs


def test_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "_CUDA_VIEW", None)
    monkeypatch.setattr(worker.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(worker, "_ray_gpus", lambda: (True, []))
    assert worker._device("auto") == "cpu"  # a Ray task without a GPU stays on the CPU
    with pytest.raises(JacpipeError, match="Ray gave this task no GPU"):
        worker._device("cuda")
    monkeypatch.setattr(worker, "_ray_gpus", lambda: (True, ["1"]))
    assert worker._device("auto") == "cuda"
    assert worker._device("cpu") == "cpu"
    monkeypatch.setattr(worker, "_ray_gpus", lambda: (False, []))
    assert worker._device("auto") == "cuda"  # outside Ray: whatever torch sees
    monkeypatch.setattr(worker.torch.cuda, "is_available", lambda: False)
    assert worker._device("auto") == "cpu"


def test_a_gpu_shard_encodes_on_its_share_of_the_host(tmp_path) -> None:
    """On a GPU the host's CPUs are idle: a shard encodes on CPUs / GPUs - 1 threads."""
    _, _, (spec, _) = _specs(tmp_path, "mlp", {"n": 8, "m": 8}, threads=1)
    assert worker.encoders(spec, "cpu", host=(16, 1)) == 1  # on the CPU: threads - 1, at least 1
    assert worker.encoders(spec, "cuda", host=(16, 1)) == 15
    assert worker.encoders(spec, "cuda", host=(16, 4)) == 3
    assert worker.encoders(spec, "cuda", host=(2, 8)) == 1
    wide = _specs(tmp_path, "mlp", {"n": 8, "m": 8}, threads=9)[2][0]
    assert worker.encoders(wide, "cuda", host=(16, 4)) == 8  # never fewer than its own threads
    cpus, gpus = worker._host()  # outside Ray: this process's view
    assert cpus == (os.cpu_count() or 1) and gpus >= 1


def test_gpu_ids_record_the_gpu_torch_really_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reused worker given GPU 1 after torch opened GPU 0 computes on 0: say so."""
    monkeypatch.setattr(worker, "_ray_gpus", lambda: (True, ["1"]))
    monkeypatch.setattr(worker, "_CUDA_VIEW", None)
    assert worker._gpu_ids() == ["1"]
    monkeypatch.setattr(worker, "_CUDA_VIEW", "0")
    monkeypatch.setattr(worker.torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(worker.torch.cuda, "current_device", lambda: 0)
    assert worker._gpu_ids() == ["0"]
    monkeypatch.setattr(worker, "_CUDA_VIEW", "0,1")  # torch sees both: Ray's id holds
    assert worker._gpu_ids() == ["1"]


def test_nan_and_inf_are_counted_per_shard_and_reported(ray_session, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "tests.faultjobs:nonfinite", "--shards", 3, "--method", "rev",
                    "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "warning: the result holds 1 NaN and 2 Inf values (shards 0, 1)" in result.output
    man = manifest(out)
    assert [(s["nan"], s["inf"]) for s in man["shards"]] == [(1, 0), (0, 2), (0, 0)]
    assert (man["nan"], man["inf"]) == (1, 2)
    values = read_jacobian(out)
    assert np.argwhere(np.isnan(values)).tolist() == [[3, 3]]
    assert np.argwhere(np.isinf(values)).tolist() == [[10, 10], [11, 11]]

    info = json.loads(invoke("inspect", out, "--json").output)
    assert (info["nan"], info["inf"]) == (1, 2)
    assert info["nan_inf_by_shard"] == {"0": [1, 0], "1": [0, 2]}
    table = invoke("inspect", out).output
    assert any("NaN / Inf" in line and "1 / 2" in line for line in table.splitlines())
    assert "1/0" in table and "0/2" in table

    # The reference has the same NaN/Inf at the same entries: a match, with the counts shown.
    cmp = invoke("compare", out, "--json", "--job", "tests.faultjobs:nonfinite")
    report = json.loads(cmp.output)
    assert cmp.exit_code == 0 and report["ok"] is True and report["mode"] == "all"
    assert (report["nan"], report["inf"]) == (1, 2)
    assert report["extra"] == {"NaN / Inf in checked rows (result | reference)": "1 / 2 | 1 / 2"}
    shown = invoke("compare", out, "--job", "tests.faultjobs:nonfinite").output
    assert "MATCH" in shown and "1 / 2 | 1 / 2" in shown


def test_pipelined_and_serial_writers_give_bitwise_equal_parts(tmp_path):
    _, shapes, specs = _specs(tmp_path / "a", "mlp", MLP)
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    piped = [compute_shard(s) for s in specs]
    serial = [compute_shard(s.__class__(**{**s.__dict__, "out": str(tmp_path / "b")}),
                            pipelined=False) for s in specs]
    assert [r.checksum for r in piped] == [r.checksum for r in serial]
    for r in piped:
        assert r.compute_seconds > 0 and r.write_seconds > 0
        assert (tmp_path / "a" / r.file).read_bytes() == (tmp_path / "b" / r.file).read_bytes()
    _finish(tmp_path / "a", shapes, piped)
    problem = build_problem("mlp", MLP)
    import torch

    want = torch.func.jacrev(problem.fn)(problem.x).reshape(shapes.m, shapes.n).numpy()
    np.testing.assert_allclose(read_jacobian(tmp_path / "a"), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compression", ["zstd", "zstd:1", "lz4", "none"])
def test_one_and_several_encoder_threads_give_bitwise_equal_parts(tmp_path, compression):
    data = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    sums = []
    for encoders in (1, 2, 3):
        w = PartWriter(Storage(str(tmp_path)), f"p{encoders}.parquet", dense_schema(64, "float32"),
                       {"k": 1}, group_rows=32, compression=compression, encoders=encoders)
        for a in range(0, 300, 45):
            w.write(a, data[a : a + 45])
        sums.append(w.commit().checksum)
        table = pq.read_table(tmp_path / f"p{encoders}.parquet")
        got = table.column("values").combine_chunks().flatten().to_numpy().reshape(-1, 64)
        assert np.array_equal(got, data)
        assert table.column("row").to_pylist() == list(range(300))
        pf = pq.ParquetFile(tmp_path / f"p{encoders}.parquet")
        assert pf.num_row_groups == 10 and pf.metadata.row_group(3).column(0).statistics.min == 96
        codec = pf.metadata.row_group(0).column(1).compression
        assert codec == {"none": "UNCOMPRESSED", "lz4": "LZ4"}.get(compression, "ZSTD")
    assert len(set(sums)) == 1
    # The same through compute_shard: threads=3 means 2 encoder threads.
    _, _, specs1 = _specs(tmp_path / "t1", "mlp", MLP, shards=1, threads=1)
    _, _, specs3 = _specs(tmp_path / "t3", "mlp", MLP, shards=1, threads=3)
    os.makedirs(tmp_path / "t1")
    os.makedirs(tmp_path / "t3")
    assert compute_shard(specs1[0]).checksum == compute_shard(specs3[0]).checksum


@pytest.mark.parametrize(("job", "params", "group", "chunk", "first"), [
    ("mlp", MLP, 16, 16, 4),  # 4 pieces of 4 rows in a 16-row group
    ("robot_arm", {"batch": 9}, 64, 48, 24),  # a 32-row piece ends at sample 2 (m = 12)
])
def test_the_first_block_is_one_piece_and_the_rest_keep_their_chunk(
    tmp_path, monkeypatch, job, params, group, chunk, first
):
    """worker NOTE: [A small first block]: same bytes, the writer starts one piece in."""
    from pipeline.runner import worker
    from pipeline.store import parts

    monkeypatch.setattr(parts, "PIECE_BYTES", 64 if job == "mlp" else 2048)
    problem, shapes, specs = _specs(tmp_path / "a", job, params, shards=1, group_rows=group,
                                    chunk=chunk)
    spec = specs[0]
    blocks = []
    real = PartWriter.write

    def spy(self, a, block, **kw):
        blocks.append((a, len(block)))
        return real(self, a, block, **kw)

    monkeypatch.setattr(PartWriter, "write", spy)
    os.makedirs(tmp_path / "a")
    ramped = compute_shard(spec)
    assert blocks[0] == (0, first)
    sizes = [b for _, b in blocks[1:]]
    assert sum(sizes) == spec.rows - first and max(sizes) == chunk
    _finish(tmp_path / "a", shapes, [ramped])
    import torch

    if job == "mlp":
        want = torch.func.jacrev(problem.fn)(problem.x).reshape(shapes.m, shapes.n)
    else:
        want = torch.func.vmap(torch.func.jacrev(problem.fn))(problem.x).reshape(-1, shapes.n)
    got = read_jacobian(tmp_path / "a").reshape(-1, shapes.n)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    # Without the ramp: other blocks, the same row groups and values (to rounding:
    # a vectorised pass over other rows may round the last bit differently).
    blocks.clear()
    monkeypatch.setattr(worker, "_first_block_end", lambda spec, chunk: spec.start)
    os.makedirs(tmp_path / "b")
    plain = compute_shard(spec.__class__(**{**spec.__dict__, "out": str(tmp_path / "b")}))
    assert blocks[0] == (0, chunk)
    _finish(tmp_path / "b", shapes, [plain])
    groups = [pq.ParquetFile(tmp_path / d / ramped.file).metadata.num_row_groups for d in "ab"]
    piece = 4 if job == "mlp" else 32
    assert groups[0] == groups[1] == -(-spec.rows // piece)
    np.testing.assert_allclose(read_jacobian(tmp_path / "b"), read_jacobian(tmp_path / "a"),
                               rtol=1e-6, atol=1e-7)


def test_a_failing_writer_thread_aborts_the_shard_cleanly(tmp_path, monkeypatch):
    _, _, specs = _specs(tmp_path, "mlp", MLP, shards=1)
    os.makedirs(tmp_path, exist_ok=True)

    calls = {"n": 0}
    real = PartWriter.write

    def broken(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (injected)")
        return real(self, *a, **kw)

    monkeypatch.setattr(PartWriter, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        compute_shard(specs[0])
    left = [f for f in os.listdir(tmp_path) if "part" in f]
    assert left == []  # no part, no temp file
    assert not (tmp_path / "_manifest.parquet").exists()
    monkeypatch.setattr(PartWriter, "write", real)
    assert compute_shard(specs[0]).rows == specs[0].rows  # the retry works


def test_a_failing_compute_stops_the_writer_thread(tmp_path, monkeypatch):
    import threading

    from pipeline.runner import worker

    _, _, specs = _specs(tmp_path, "mlp", MLP, shards=1)
    os.makedirs(tmp_path, exist_ok=True)
    real = worker.iter_rows

    def broken(*a, **kw):
        for i, item in enumerate(real(*a, **kw)):
            if i == 2:
                raise RuntimeError("NaN in the model (injected)")
            yield item

    monkeypatch.setattr(worker, "iter_rows", broken)
    with pytest.raises(RuntimeError, match="injected"):
        compute_shard(specs[0])
    assert [f for f in os.listdir(tmp_path) if "part" in f] == []
    assert not any(t.name == "jacpipe-writer" for t in threading.enumerate())
