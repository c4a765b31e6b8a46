"""``pipeline.store.manifest``: the manifest, its commit log and its corruption."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions
from pipeline.core.shard import ShardResult
from pipeline.runner import driver as runner
from pipeline.store.manifest import COMMIT_LOG, MANIFEST, MANIFEST_KEY, Manifest
from pipeline.store.parts import part_name
from pipeline.store.reader import open_jacobian, read_jacobian
from pipeline.store.storage import Storage
from tests.clitools import error_line
from tests.clitools import error_line as _one_error
from tests.faultruns import copy_of_clean, invoke, run_crashy
from tests.manifests import read_doc, write_doc
from tests.store.written import write_result


def test_manifest_validates_itself(tmp_path, matrix):
    doc = write_result(tmp_path, matrix, [0, 12, 23])
    man = Manifest.read(Storage(str(tmp_path)))
    assert [s.index for s in man.committed] == [0, 1] and man.dtype == "float64"
    assert Manifest.from_json(man.to_json()).to_json() == man.to_json()
    for edit, match in [
        (lambda d: d["plan"].__setitem__(1, [12, 22]), "plan covers 22 rows"),
        (lambda d: d["shards"][1].__setitem__("file", "part-00009.parquet"), "does not match"),
        (lambda d: d.__setitem__("layout", "diagonal"), "unknown layout"),
    ]:
        bad = json.loads(json.dumps(doc))
        edit(bad)
        with pytest.raises(ValueError, match=match):
            Manifest.from_json(bad)


def test_results_with_the_old_json_manifest_still_read_and_resume(tmp_path):
    """Before the manifest moved into Parquet it was ``_manifest.json``: still read and resumed."""
    import polars as pl

    from pipeline.core.options import RunOptions
    from pipeline.runner import driver as runner
    from tests.manifests import read_doc

    out = tmp_path / "out"
    opts = RunOptions(job="mlp", params=["n=12", "m=9", "hidden=4"], shards=3, out=str(out),
                      executor="local", progress=False)
    runner.run(opts, echo=lambda _: None)
    new = read_jacobian(out)
    assert pl.read_parquet(out).height == 9 and sorted(os.listdir(out)) == [
        "_manifest.parquet", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    doc = read_doc(out)
    (out / "_manifest.json").write_text(json.dumps(doc, indent=1))
    (out / "_manifest.parquet").unlink()
    np.testing.assert_array_equal(read_jacobian(out), new)
    assert open_jacobian(out).manifest.status == "complete"
    # An interrupted old result: shard 1 was never committed.
    doc["shards"] = [s for s in doc["shards"] if s["index"] != 1]
    doc["status"] = "interrupted"
    (out / "_manifest.json").write_text(json.dumps(doc, indent=1))
    lines: list[str] = []
    runner.run(opts, echo=lines.append)
    assert lines == ["resuming: 2 of 3 shards already committed"]
    assert not (out / "_manifest.json").exists()
    assert read_doc(out)["status"] == "complete"
    np.testing.assert_array_equal(read_jacobian(out), new)


cli = CliRunner()


def _run(*args: object):
    return cli.invoke(app, [str(a) for a in args])


def test_commits_append_to_a_log_that_readers_merge_before_compaction(ray_session, tmp_path):
    out = tmp_path / "out"
    opts = RunOptions(job="mlp", params=["n=20", "m=30", "hidden=8"], shards=5, out=str(out),
                      progress=False)
    runner.run(opts, echo=lambda _: None)
    assert not (out / COMMIT_LOG).exists()  # compacted into the manifest at the end
    full = read_jacobian(out)
    # A killed run: the manifest lists 2 shards, the log holds the other 3 (and a torn line).
    doc = read_doc(out)
    tail = doc["shards"][2:]
    doc["shards"], doc["status"] = doc["shards"][:2], "running"
    write_doc(out, doc)
    with open(out / COMMIT_LOG, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in tail)
        f.write('{"index": 4, "sta')  # torn by the crash: not a commit
    np.testing.assert_array_equal(read_jacobian(out), full)
    info = json.loads(_run("inspect", out, "--json").output)
    assert info["shards_committed"] == 5 and info["problems"] == []
    # Resume compacts the log into the manifest and keeps every shard.
    summary = runner.run(opts, echo=lambda _: None)
    assert summary.skipped == 5 and not (out / COMMIT_LOG).exists()
    assert len(read_doc(out)["shards"]) == 5


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["shapes"].__setitem__("out_shape", [10**13]), "out of range"),
    (lambda d: d["shapes"].__setitem__("n", 7), "'shapes.n' is 7"),
    (lambda d: d.__setitem__("layout", "diagonal"), "unknown layout"),
    (lambda d: d["shapes"].__setitem__("dtype", "float16"), "dtype 'float16'"),
])
def test_tampered_manifests_are_one_line_exit_2(ray_session, tmp_path, edit, match):
    out = tmp_path / "out"
    runner.run(RunOptions(job="mlp", params=["n=8", "m=6", "hidden=4"], shards=2, out=str(out),
                          progress=False), echo=lambda _: None)
    doc = read_doc(out)
    edit(doc)
    write_doc(out, doc)
    for cmd in (["inspect", out], ["compare", out]):
        result = _run(*cmd)
        assert result.exit_code == 2 and match in _one_error(result)


def test_the_commit_log_is_fsynced_at_most_every_commit_sync_seconds(tmp_path, monkeypatch):
    """Group commit: every line is written at once, fsyncs are spaced (NOTE: [Group commit])."""
    from pipeline.store import manifest as manifest_mod

    syncs = []
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd))
    monkeypatch.setattr(manifest_mod, "_last_sync", {})
    storage = Storage(str(tmp_path))
    entries = [ShardResult(i, i, i + 1, part_name(i), 1, f"{i:064x}") for i in range(50)]
    for entry in entries:
        manifest_mod.append_commit(storage, entry)
    assert 1 <= len(syncs) < 50
    assert [e["index"] for e in manifest_mod.read_commit_log(storage)] == list(range(50))
    monkeypatch.setattr(manifest_mod, "COMMIT_SYNC_SECONDS", 0.0)
    manifest_mod.append_commit(storage, entries[0])
    assert len(syncs) >= 2


def _raw(change):
    """Corrupt the manifest file's bytes."""

    def apply(out):
        path = out / MANIFEST
        path.write_bytes(change(path.read_bytes()))

    return apply


def _edit(change):
    """Corrupt the manifest document inside a valid container."""

    def apply(out):
        man = read_doc(out)
        change(man)
        write_doc(out, man)

    return apply


def _not_json(out):
    path = out / MANIFEST
    schema = pq.read_schema(path)
    pq.write_metadata(schema.with_metadata({MANIFEST_KEY: b'{"format_version": 1, "sh'}), path)


CORRUPT_MANIFESTS = {
    "truncated": _raw(lambda raw: raw[: len(raw) // 2]),
    "garbage bytes": _raw(lambda raw: b"\xff\xfe\x00 not json"),
    "empty": _raw(lambda raw: b""),
    "not JSON inside": _not_json,
    "a Parquet file of no manifest": lambda out: pq.write_metadata(
        pq.read_schema(out / MANIFEST).with_metadata({}), out / MANIFEST
    ),
    "entry names another file": _edit(
        lambda m: m["shards"][1].update(file="../../etc/passwd")
    ),
    "entry for other rows": _edit(lambda m: m["shards"][2].update(start=1)),
    "duplicate entry": _edit(lambda m: m["shards"].append(dict(m["shards"][0]))),
    "no shapes": _edit(lambda m: m.pop("shapes")),
}


@pytest.mark.parametrize("how", list(CORRUPT_MANIFESTS))
def test_corrupt_manifest_is_one_clear_error(ray_session, tmp_path, clean, how):
    out = copy_of_clean(clean, tmp_path)
    path = out / MANIFEST
    CORRUPT_MANIFESTS[how](out)
    for command in ("inspect", "compare"):
        line = error_line(invoke(command, out))
        assert f"{path} is corrupt" in line and "--overwrite" in line
    with pytest.raises(JacpipeError, match="is corrupt"):
        read_jacobian(out)
    line = error_line(run_crashy(out, clean.markers, "--shards", 6))
    assert f"{path} is corrupt" in line
    if how == "truncated":  # --overwrite starts again from nothing
        result = run_crashy(out, clean.markers, "--shards", 6, "--overwrite")
        assert result.exit_code == 0, result.output
        assert "(6 computed, 0 resumed)" in result.output
        assert np.array_equal(read_jacobian(out), clean.values)


def test_a_manifest_nested_too_deeply_is_a_corrupt_manifest_not_a_traceback(tmp_path):
    from tests.store.results import write_result as write_dense

    out = tmp_path / "deep"
    write_dense(str(out))
    deep = b"[" * 100_000 + b"]" * 100_000
    schema = pq.read_schema(out / MANIFEST)
    pq.write_metadata(schema.with_metadata({MANIFEST_KEY: deep}), out / MANIFEST)
    with pytest.raises(JacpipeError, match=r"is corrupt \(nested too deeply") as caught:
        read_jacobian(out)
    assert "--overwrite" in str(caught.value)
    line = _one_error(CliRunner().invoke(app, ["inspect", str(out)]))
    assert f"{out / MANIFEST} is corrupt (nested too deeply" in line


def test_a_commit_log_nested_too_deeply_is_a_corrupt_manifest(tmp_path):
    from tests.store.results import write_result as write_dense

    out = tmp_path / "deep"
    write_dense(str(out))
    (out / COMMIT_LOG).write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(JacpipeError, match=r"is corrupt \(nested too deeply"):
        read_jacobian(out)
