"""Hardening (issue 14, part 2): row selection, part shapes, secrets in messages, the cluster.

Results here are written without Ray (:func:`write_result`: the manifest, the
parts and the commits a run would make), so the tests are fast and run on S3
as they do locally.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import read_jacobian
from pipeline.cli import app
from pipeline.core.errors import JacpipeError
from pipeline.core.shapes import Shapes
from pipeline.core.shard import ShardResult
from pipeline.store.folder import ResultFolder
from pipeline.store.manifest import MANIFEST, Manifest, unwrap_manifest
from pipeline.store.parts import PartWriter, dense_schema, part_name
from pipeline.store.reader import open_jacobian
from pipeline.store.storage import Storage
from tests.manifests import read_doc, with_doc, write_doc

ROWS, N = 12, 5
cli = CliRunner()


def write_result(
    out: str, *, rows: int = ROWS, n: int = N, shards: int = 3, dtype: str = "float64",
    values: np.ndarray | None = None,
) -> np.ndarray:
    """A complete dense result of ``fn(x) = J @ x`` in ``out``, as a run writes it; returns J."""
    storage = Storage(out)
    J = np.arange(rows * n, dtype=dtype).reshape(rows, n) if values is None else values
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    plan = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    manifest = Manifest(
        job="tests.userjobs:matrix_io", params={}, fingerprint={}, method="rev",
        layout="dense", plan=plan, shapes=Shapes("jacobian", (n,), (rows,), None, dtype),
        run_id="r1",
    )
    folder = ResultFolder(storage)
    folder.prepare(manifest, resume=False, overwrite=True)
    for index, (a, b) in enumerate(plan):
        writer = PartWriter(storage, part_name(index), dense_schema(n, dtype), {}, group_rows=2)
        writer.write(a, J[a:b])
        info = writer.commit()
        folder.commit(ShardResult(index, a, b, info.file, info.rows, info.checksum, info.bytes))
    folder.finish("complete")
    return J


def _invoke(*args: object):
    return cli.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------
# rows=: integers, slices and masks mean what numpy means; anything else is refused
# ---------------------------------------------------------------------------


def test_rows_accepts_integers_slices_and_masks_as_numpy_does(tmp_path: Path) -> None:
    J = write_result(str(tmp_path))
    mask = np.zeros(ROWS, bool)
    mask[[1, 7, 11]] = True
    for rows in (3, [5, 0, 5], np.array([11, 2], np.uint8), slice(2, 9, 3), slice(None, None, -1),
                 mask, list(mask), [], np.array([], np.int64)):
        got = read_jacobian(tmp_path, rows=rows)
        want = J[np.arange(ROWS)[rows]] if not isinstance(rows, int) else J[[rows]]
        if isinstance(rows, list) and not rows:
            want = J[:0]
        np.testing.assert_array_equal(got, want.reshape(-1, N), err_msg=repr(rows))
    assert [b.tolist() for b, _ in open_jacobian(tmp_path).iter_blocks(mask)] == [[1], [7], [11]]


@pytest.mark.parametrize("rows,match", [
    ([1.7], "expected an integer, integers, a slice or a boolean mask"),
    (np.array([1.0, 2.0]), "expected an integer"),
    ("3", "expected an integer"),
    (["a"], "expected an integer"),
    (np.ones(ROWS - 1, bool), f"one entry per row \\({ROWS}\\)"),
    (np.ones((2, ROWS), bool), "one entry per row"),
    ([ROWS], f"row {ROWS} out of range: the result has {ROWS} rows"),
    ([-1], "row -1 out of range"),
    (slice(0.5, 3), "integer bounds"),
    ([[1, 2], [3]], "expected an integer"),
])
def test_rows_of_any_other_kind_are_one_clear_error(tmp_path: Path, rows, match) -> None:
    write_result(str(tmp_path))
    with pytest.raises(JacpipeError, match=match):
        read_jacobian(tmp_path, rows=rows)


def test_sample_refuses_non_integers(tmp_path: Path) -> None:
    result = open_jacobian(_batched(tmp_path))
    np.testing.assert_array_equal(result.read(sample=1), result.read()[1])
    for bad in ([1.7], "1", [True]):
        with pytest.raises(JacpipeError, match="expected an integer or integers"):
            result.read(sample=bad)


def _batched(out: Path) -> Path:
    """A batched result (2 samples of 3 x 4) written like :func:`write_result`."""
    write_result(str(out), rows=6, n=4, shards=2)
    _edit_manifest(out, lambda d: d["shapes"].update(
        kind="batched", batch=2, out_shape=[3], m=3, total_rows=6))
    return out


# ---------------------------------------------------------------------------
# A part whose shape is not the manifest's: caught on read and on resume
# ---------------------------------------------------------------------------


def _edit_manifest(out: Path, edit) -> None:
    doc = read_doc(out)
    edit(doc)
    write_doc(out, doc)


def _swap_part(out: Path, index: int, source: Path) -> None:
    """Replace part ``index`` by ``source`` and forge its manifest entry to match it."""
    name = part_name(index)
    (out / name).write_bytes(source.read_bytes())
    sha, size = Storage(str(out)).sha256(name), (out / name).stat().st_size

    def forge(doc):
        doc["shards"][index]["checksum"], doc["shards"][index]["bytes"] = sha, size

    _edit_manifest(out, forge)


def test_an_edited_dtype_is_caught_on_read_not_downcast(tmp_path: Path) -> None:
    write_result(str(tmp_path))
    _edit_manifest(tmp_path, lambda d: d["shapes"].__setitem__("dtype", "float32"))
    for verify in (True, False):
        with pytest.raises(JacpipeError, match=(
            r"part-00000.parquet\): holds double rows of width 5, the manifest says "
            r"float32 x 5; rerun `jacpipe run` with --overwrite"
        )):
            read_jacobian(tmp_path, verify=verify)
    problems = open_jacobian(tmp_path).check(checksums=True)
    assert [p.index for p in problems] == [0, 1, 2]
    result = _invoke("inspect", tmp_path)
    assert result.exit_code == 1 and "holds double rows of width 5" in result.output
    result = _invoke("export", tmp_path, tmp_path / "J.npy")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "holds double rows of width 5, the manifest says float32 x 5" in errors[0]
    assert not (tmp_path / "J.npy").exists()


def test_a_part_of_another_shape_with_a_matching_checksum_is_caught_and_recomputed(
    tmp_path: Path,
) -> None:
    """Part 1 replaced by a well-formed part of other rows/width, its manifest entry updated."""
    write_result(str(tmp_path))
    other = tmp_path / "other"
    write_result(str(other), n=N + 2, rows=ROWS)
    _swap_part(tmp_path, 1, other / "part-00001.parquet")
    with pytest.raises(JacpipeError, match="holds double rows of width 7, the manifest says "
                                           "float64 x 5"):
        read_jacobian(tmp_path)
    # rows 0..4 live in part 0 only: still readable
    np.testing.assert_array_equal(read_jacobian(tmp_path, rows=[0, 3]).shape, (2, N))
    # resume trusts only parts that check out (folder._trusted_shards uses check())
    keep = ResultFolder(Storage(str(tmp_path)))._trusted_shards()
    assert sorted(keep) == [0, 2]


def test_a_part_holding_other_rows_is_caught(tmp_path: Path) -> None:
    write_result(str(tmp_path))
    other = tmp_path / "other"
    write_result(str(other), shards=3)
    # part 2 of the same width but holding rows 0..4 (another plan's first shard)
    _swap_part(tmp_path, 2, other / "part-00000.parquet")
    problems = open_jacobian(tmp_path).check(checksums=False)
    assert [(p.index, p.reason) for p in problems] == [
        (2, "holds rows 0..4, the manifest says rows 8..12")]


def test_nothing_is_allocated_before_the_needed_parts_are_checked(tmp_path: Path) -> None:
    write_result(str(tmp_path))
    (tmp_path / "part-00002.parquet").unlink()
    _edit_manifest(tmp_path, lambda d: None)
    result = open_jacobian(tmp_path)
    calls = []
    real_empty = np.empty

    def spy(*args, **kwargs):
        calls.append(args)
        return real_empty(*args, **kwargs)

    np.empty = spy
    try:
        with pytest.raises(JacpipeError, match=r"shard 2 \(part-00002.parquet\): missing"):
            result.read()
    finally:
        np.empty = real_empty
    assert calls == []


# ---------------------------------------------------------------------------
# Secrets in URIs never reach a message
# ---------------------------------------------------------------------------


def _s3_error_paths(s3_server, boto) -> list[tuple[str, object]]:
    """``(what, action)`` pairs: each action fails on a secret-bearing URI."""
    bucket = s3_server.bucket
    paths: list[tuple[str, object]] = []

    def result_at(prefix: str) -> str:
        uri = s3_server.uri(prefix)
        write_result(uri)
        return uri

    missing = s3_server.uri("nothing/here")
    paths.append(("missing result", missing))
    uri = result_at("corrupt")
    boto.put_object(Bucket=bucket, Key=f"corrupt/{MANIFEST}", Body=b"{not json")
    paths.append(("corrupt manifest", uri))
    uri = result_at("nopart")
    boto.delete_object(Bucket=bucket, Key="nopart/part-00001.parquet")
    paths.append(("missing part", uri))
    uri = result_at("badpart")
    boto.put_object(Bucket=bucket, Key="badpart/part-00002.parquet", Body=b"x" * 10)
    paths.append(("truncated part", uri))
    uri = result_at("dtype")
    raw = boto.get_object(Bucket=bucket, Key=f"dtype/{MANIFEST}")["Body"].read()
    doc = json.loads(unwrap_manifest(raw))
    doc["shapes"]["dtype"] = "float32"
    boto.put_object(Bucket=bucket, Key=f"dtype/{MANIFEST}", Body=with_doc(raw, doc))
    paths.append(("edited dtype", uri))
    paths.append(("missing bucket", missing.replace(bucket, bucket + "-gone", 1)))
    paths.append(("bad option", s3_server.uri("x") + "&no_such_option=1"))
    return paths


def test_a_secret_in_the_uri_is_in_no_message_of_any_reader(s3_server, monkeypatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    secret = s3_server.secret_key
    checked = 0
    for what, uri in _s3_error_paths(s3_server, s3_server.boto3()):
        assert secret in uri
        for rows in (None, [ROWS]):  # a whole read, and bad rows
            try:
                read_jacobian(uri, rows=rows)
            except JacpipeError as exc:
                assert secret not in str(exc), (what, str(exc))
                checked += 1
        for cmd in (["inspect", uri], ["inspect", uri, "--json"], ["compare", uri],
                    ["export", uri, os.devnull + ".npy"]):
            result = _invoke(*cmd)
            assert secret not in result.output, (what, cmd, result.output)
            assert result.exception is None or isinstance(result.exception, SystemExit) or (
                secret not in str(result.exception)), (what, cmd)
            assert result.exit_code != 0, (what, cmd, result.output)
            checked += 1
    assert checked >= 40
    good = s3_server.uri("good")
    write_result(good)
    for rows in ([ROWS], [1.5], np.ones(3, bool)):
        with pytest.raises(JacpipeError) as err:
            read_jacobian(good, rows=rows)
        assert secret not in str(err.value)
    np.testing.assert_array_equal(read_jacobian(good, rows=[1]), np.arange(N, 2 * N)[None])


# ---------------------------------------------------------------------------
# `make cluster-up` listens on 127.0.0.1 only
# ---------------------------------------------------------------------------

#: Processes of a local cluster that Ray 2.60 lets listen beyond 127.0.0.1 whatever
#: ``ray start`` is told (it swaps a loopback --node-ip-address for the routable
#: one; gRPC servers and metrics exporters then bind every interface). Every one
#: of them needs the cluster's token, or serves only metrics: README, "Listening
#: ports".
ALLOWED_ANY_ADDRESS = frozenset({
    "gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard.py",
    "monitor.py", "ray.util.client.server",
})


@pytest.mark.cluster
def test_the_local_cluster_listens_on_loopback_only(ray_cluster) -> None:
    """The Jobs API is on 127.0.0.1 only; nothing outside the allow-list listens elsewhere."""
    sockets = ray_cluster.listening()
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet", "ray::DashboardAgent"} <= names, sockets
    exposed = [(name, addr, port) for name, addr, port in sockets
               if not addr.startswith("127.") and addr != "::1"]
    assert {name for name, _, _ in exposed} <= ALLOWED_ANY_ADDRESS, sockets
    dash_port = int(ray_cluster.dashboard_url.rsplit(":", 1)[1])
    assert [s for s in exposed if s[2] == dash_port] == [], sockets
    assert any(port == dash_port for _, _, port in sockets), sockets


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


def test_an_interrupt_during_a_commit_never_drops_a_logged_commit(tmp_path: Path, monkeypatch):
    """SIGTERM / Ctrl-C raised as the log line is fsynced: the final manifest still has it.

    The final manifest replaces the commit log, so every logged commit must be
    in the driver's memory first (seen once in CI: 2 logged, 1 kept).
    """
    from pipeline.store import folder as folder_mod

    write_result(str(tmp_path / "ref"))
    storage = Storage(str(tmp_path / "out"))
    manifest = Manifest(
        job="tests.userjobs:matrix_io", params={}, fingerprint={}, method="rev", layout="dense",
        plan=[(0, 6), (6, 12)], shapes=Shapes("jacobian", (N,), (ROWS,), None, "float64"),
        run_id="r2",
    )
    folder = ResultFolder(storage)
    folder.prepare(manifest, resume=False, overwrite=True)
    real = folder_mod.append_commit

    def interrupted(storage_, result):
        real(storage_, result)  # the line is in the log...
        raise KeyboardInterrupt  # ...and the signal lands before anything else runs

    monkeypatch.setattr(folder_mod, "append_commit", interrupted)
    ref = read_doc(tmp_path / "ref")["shards"][0]
    with pytest.raises(KeyboardInterrupt):
        folder.commit(ShardResult(0, 0, 6, ref["file"], 6, ref["checksum"], ref["bytes"]))
    folder.finish("interrupted")
    assert [s["index"] for s in read_doc(tmp_path / "out")["shards"]] == [0]
