"""``pipeline.store.storage``: local and S3 storage, secrets, runs on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from torch.autograd.functional import jacobian
from typer.testing import CliRunner

from pipeline import read_jacobian
from pipeline.cli import app
from pipeline.core.errors import JacpipeError
from pipeline.problem.problem import build_problem
from pipeline.store.manifest import MANIFEST, unwrap_manifest
from pipeline.store.parts import PartWriter, dense_schema
from pipeline.store.reader import open_jacobian
from pipeline.store.storage import Storage
from tests.manifests import with_doc
from tests.store.results import ROWS, N, write_result

pytest.importorskip("moto.server")


cli = CliRunner()


def _invoke(*args: object):
    return cli.invoke(app, [str(a) for a in args])


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


def _table(start: int, rows: int, n: int = 3):
    import pyarrow as pa

    values = pa.array([float(i) for i in range(rows * n)], pa.float64())
    return pa.table(
        {
            "row": pa.array(range(start, start + rows), pa.int64()),
            "values": pa.FixedSizeListArray.from_arrays(values, n),
        }
    )


def _write_parquet(fs, path: str, table) -> None:
    import pyarrow.parquet as pq

    with fs.open_output_stream(path) as sink:
        with pq.ParquetWriter(sink, table.schema, compression="zstd") as writer:
            writer.write_table(table)


def test_write_temp_rename_list_read(s3_server) -> None:
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs = s3_server.filesystem()
    out = f"{s3_server.bucket}/run1"
    fs.create_dir(out)
    table = _table(0, 5)
    tmp = f"{out}/.part-00000.{uuid.uuid4().hex}.tmp"
    _write_parquet(fs, tmp, table)
    fs.move(tmp, f"{out}/part-00000.parquet")
    _write_parquet(fs, f"{out}/part-00001.parquet", _table(5, 2))
    with fs.open_output_stream(f"{out}/_manifest.json") as f:
        f.write(b'{"format_version": 1}')
    # a crash leftover: hidden from pyarrow.dataset by its leading dot
    with fs.open_output_stream(f"{out}/.part-00002.dead.tmp") as f:
        f.write(b"partial")

    infos = fs.get_file_info(pafs.FileSelector(out, recursive=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    assert names == [".part-00002.dead.tmp", "_manifest.json", "part-00000.parquet",
                     "part-00001.parquet"]  # fmt: skip
    assert fs.get_file_info(tmp).type == pafs.FileType.NotFound

    assert pq.read_table(f"{out}/part-00000.parquet", filesystem=fs).equals(table)
    with fs.open_input_file(f"{out}/part-00000.parquet") as f:
        assert pq.ParquetFile(f).metadata.num_rows == 5
    dataset = ds.dataset(out, format="parquet", filesystem=fs)
    assert sorted(p.rsplit("/", 1)[1] for p in dataset.files) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert sorted(dataset.to_table(columns=["row"])["row"].to_pylist()) == list(range(7))


def test_rename_semantics(s3_server) -> None:
    """move() on S3 is CopyObject + DeleteObject: files only, overwrites, not atomic."""
    import pyarrow.fs as pafs

    fs = s3_server.filesystem()
    base = f"{s3_server.bucket}/mv"
    for name, body in (("a", b"A"), ("b", b"B")):
        with fs.open_output_stream(f"{base}/{name}") as f:
            f.write(body)
    fs.move(f"{base}/a", f"{base}/b")  # silently replaces the destination
    with fs.open_input_stream(f"{base}/b") as f:
        assert f.read() == b"A"
    assert fs.get_file_info(f"{base}/a").type == pafs.FileType.NotFound
    with pytest.raises(OSError, match="NO_SUCH_KEY"):
        fs.move(f"{base}/missing", f"{base}/c")
    with pytest.raises(OSError):
        fs.move(base, f"{s3_server.bucket}/mv2")  # directories cannot be renamed


def test_object_invisible_until_stream_closed(s3_server) -> None:
    """An upload appears only on close(): a half-written object is never listed."""
    import pyarrow.fs as pafs

    fs = s3_server.filesystem()
    path = f"{s3_server.bucket}/late/obj.bin"
    stream = fs.open_output_stream(path)
    stream.write(b"x" * 1000)
    assert fs.get_file_info(path).type == pafs.FileType.NotFound
    stream.close()
    assert fs.get_file_info(path).size == 1000


def test_bucket_creation_needs_opt_in(s3_server) -> None:
    fresh = f"{s3_server.bucket}-new"
    with pytest.raises(OSError, match="allow_bucket_creation"):
        s3_server.filesystem().create_dir(fresh)
    fs = s3_server.filesystem(allow_bucket_creation=True, allow_bucket_deletion=True)
    fs.create_dir(fresh)
    fs.delete_dir(fresh)


def test_from_uri_with_query_and_credentials(s3_server) -> None:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    _write_parquet(s3_server.filesystem(), f"{s3_server.bucket}/u/part-00000.parquet", _table(0, 3))
    fs, path = pafs.FileSystem.from_uri(s3_server.uri("u"))
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == f"{s3_server.bucket}/u"
    assert pq.read_table(f"{path}/part-00000.parquet", filesystem=fs).num_rows == 3
    with pytest.raises(ValueError, match="secret_key"):
        pafs.FileSystem.from_uri(
            f"s3://{s3_server.bucket}/u?endpoint_override={s3_server.endpoint}"
            f"&scheme=http&access_key=k&secret_key=s"
        )


def test_from_uri_with_aws_env(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL + AWS_ACCESS_KEY_ID/SECRET: a bare s3:// URI reaches the server."""
    import pyarrow.fs as pafs

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    fs, path = pafs.FileSystem.from_uri(f"s3://{s3_server.bucket}/envrun")
    with fs.open_output_stream(f"{path}/x.bin") as f:
        f.write(b"123")
    info = s3_server.filesystem().get_file_info(f"{s3_server.bucket}/envrun/x.bin")
    assert info.size == 3


SMALL = ["-p", "n=60", "-p", "m=50", "-p", "hidden=16", "-p", "dtype=float64"]


AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _reference() -> np.ndarray:
    problem = build_problem("mlp", {"n": 60, "m": 50, "hidden": 16, "dtype": "float64"})
    return jacobian(problem.fn, problem.x).numpy()


def _keys(s3_server, prefix: str) -> list[str]:
    listing = s3_server.boto3().list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)


def test_run_to_s3_with_env_credentials_then_read_and_compare(
    s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jacpipe run --out s3://bucket/prefix`; workers get endpoint and keys from AWS_*.

    The CLI runs as a subprocess so that its embedded Ray, and so every worker,
    starts with the AWS_* variables (the session's Ray was started without them).
    """
    uri = f"s3://{s3_server.bucket}/runs/mlp"
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS and k != "RAY_ADDRESS"}
    env.update(s3_server.env)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "mlp", *SMALL, "--shards", "4",
         "--num-cpus", "2", "--out", uri, "--no-progress"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {uri}" in done.stdout
    keys = _keys(s3_server, "runs/mlp/")
    parts = [k for k in keys if k.rsplit("/", 1)[1].startswith("part-")]
    assert parts == [f"runs/mlp/part-{i:05d}.parquet" for i in range(4)]
    # written in place: no temp objects, no attempt markers, no manifest temp files left
    assert [k for k in keys if k.rsplit("/", 1)[1].startswith(".")] == []
    assert f"runs/mlp/{MANIFEST}" in keys
    assert not list(tmp_path.iterdir())  # nothing written locally

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    np.testing.assert_allclose(read_jacobian(uri), _reference(), rtol=1e-12, atol=1e-14)
    result = open_jacobian(uri)
    assert result.check(checksums=True) == []
    assert [s.index for s in result.committed] == [0, 1, 2, 3]
    assert all(s.node_id and s.device == "cpu" for s in result.committed)
    cmp = invoke("compare", uri, "--json")
    assert cmp.exit_code == 0, cmp.output
    report = json.loads(cmp.output)
    assert report["ok"] and report["rows_checked"] == 50


def test_credentials_in_the_uri_resume_and_read_back(
    ray_session, s3_server, no_aws_env: None
) -> None:
    """Keys in the URI reach the (already running) workers through the task spec."""
    uri = s3_server.uri("cred/mlp")
    first = invoke("run", "mlp", *SMALL, "--shards", 3, "--out", uri, "--no-progress")
    assert first.exit_code == 0, first.output
    again = invoke("run", "mlp", *SMALL, "--shards", 3, "--out", uri, "--no-progress")
    assert again.exit_code == 0 and "3 resumed" in again.output, again.output
    np.testing.assert_allclose(read_jacobian(uri), _reference(), rtol=1e-12, atol=1e-14)
    assert invoke("compare", uri).exit_code == 0
    manifest = s3_server.boto3().get_object(
        Bucket=s3_server.bucket, Key=f"cred/mlp/{MANIFEST}")["Body"].read()
    assert s3_server.secret_key.encode() not in manifest


def test_secret_in_uri_is_never_printed(ray_session, s3_server, no_aws_env: None) -> None:
    uri = s3_server.uri("masked/mlp")
    result = invoke("run", "mlp", *SMALL, "--shards", 2, "--out", uri, "--no-progress")
    assert result.exit_code == 0, result.output
    assert s3_server.secret_key not in result.output


def test_missing_bucket_is_one_clear_line(ray_session, s3_server, no_aws_env: None) -> None:
    uri = s3_server.uri("x").replace(s3_server.bucket, s3_server.bucket + "-missing", 1)
    result = invoke("run", "mlp", *SMALL, "--out", uri)
    assert result.exit_code == 2
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cannot create the folder" in errors[0], result.output
    assert "not found" in errors[0] and "Traceback" not in result.output


def test_storage_writes_in_place_on_s3_and_in_temp_files_locally(
    s3_server, tmp_path: Path
) -> None:
    s3 = Storage(s3_server.uri("st"))
    local = Storage(str(tmp_path))
    assert not s3.local and local.local
    assert s3.temp_name("part-00000.parquet") == "part-00000.parquet"
    assert local.temp_name("part-00000.parquet").startswith(".part-00000.")
    s3.makedirs()
    s3.write_atomic(MANIFEST, b"{}")
    assert s3.read_bytes(MANIFEST) == b"{}"
    assert s3.listdir() == [MANIFEST]

    schema = dense_schema(3, "float64")
    writer = PartWriter(s3, "part-00000.parquet", schema, {"x": 1}, group_rows=2)
    writer.write(0, np.arange(9, dtype=np.float64).reshape(3, 3))
    info = writer.commit()
    assert info.rows == 3 and s3.sha256("part-00000.parquet") == info.checksum
    assert s3.size("part-00000.parquet") == info.bytes

    failed = PartWriter(s3, "part-00001.parquet", schema, {"x": 1}, group_rows=2)
    failed.write(0, np.zeros((1, 3)))
    failed.abort()
    assert s3.listdir() == [MANIFEST, "part-00000.parquet"]  # nothing left of the abort


def test_storage_refuses_a_folder_under_an_object(s3_server) -> None:
    Storage(s3_server.uri("obj")).makedirs()
    Storage(s3_server.uri("obj")).write_atomic("file.bin", b"x")
    inner = Storage(s3_server.uri("obj/file.bin"))
    with pytest.raises(NotADirectoryError):
        inner.makedirs()


def test_storage_masks_secrets(s3_server) -> None:
    uri = s3_server.uri("m")
    storage = Storage(uri)
    assert s3_server.secret_key not in storage.display
    assert storage.display.startswith(f"s3://{s3_server.access_key}:***@{s3_server.bucket}/m")
    assert Storage.redact("s3://b/p?access_key=A&secret_key=B&scheme=http") == (
        "s3://b/p?access_key=A&secret_key=***&scheme=http"
    )
    assert Storage.redact("/data/a:b@c/out") == "/data/a:b@c/out"
    with pytest.raises(JacpipeError) as err:
        Storage(uri + "&no_such_option=1")
    assert s3_server.secret_key not in str(err.value) and "***" in str(err.value)


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 that accepts connections (the kernel's backlog) and never replies."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


@pytest.mark.slow  # a subprocess each
@pytest.mark.parametrize(("scheme", "server"), [
    ("gs://anonymous@", "closed"), ("gs://anonymous@", "silent"), ("s3://KEY:SECRET@", "silent")])
def test_an_unreachable_object_store_is_one_line_in_bounded_time(scheme, server, silent_port):
    """``inspect`` of a store that refuses or never answers: pyarrow's defaults ran for minutes.

    ``gs://bucket/x`` on a host without network hung for over 3.5 minutes; an
    S3 endpoint that accepts and never replies held ``inspect`` 100 s, a GCS
    one 2 minutes. Every endpoint (and Google's metadata server, used for
    credentials) is on 127.0.0.1: no traffic leaves the machine.
    """
    import time

    port = 1 if server == "closed" else silent_port
    uri = f"{scheme}bucket/x?endpoint_override=127.0.0.1:{port}&scheme=http"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GCE_", "AWS_"))}
    env.update(PYTHONPATH=os.getcwd(), GCE_METADATA_ROOT="127.0.0.1:1",
               GCE_METADATA_HOST="127.0.0.1:1", NO_COLOR="1", JACPIPE_STORE_TIMEOUT="1.5")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", uri],
                          capture_output=True, text=True, timeout=120, env=env)
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith(f"error: {Storage.redact(uri)}: the object store did not answer (")
    assert "SECRET" not in proc.stderr
    assert "check the URI, the network and the credentials" in errors[0]
    assert "JACPIPE_STORE_TIMEOUT" in errors[0]
    assert took < 60, took  # not a speed target: the default retries ran 100 s and more


def test_store_timeout_bounds_each_s3_attempt_and_a_bad_value_is_one_line(monkeypatch):
    import pyarrow.fs as pafs

    from pipeline.store import storage

    uri = "s3://bucket/x?endpoint_override=127.0.0.1:1&scheme=http&region=eu-west-1"
    monkeypatch.setenv(storage.TIMEOUT_ENV, "6")
    _, (options,) = Storage(uri).fs.__reduce__()
    assert options["connect_timeout"] == options["request_timeout"] == 2.0
    assert options["region"] == "eu-west-1" and options["endpoint_override"] == "127.0.0.1:1"
    gcs = Storage("gs://anonymous@bucket/x?endpoint_override=127.0.0.1:1&scheme=http").fs
    assert isinstance(gcs, pafs.GcsFileSystem)
    assert gcs.__reduce__()[1][0]["retry_time_limit"].total_seconds() == 6.0
    monkeypatch.delenv(storage.TIMEOUT_ENV)
    assert storage.answer_seconds() == storage.ANSWER_SECONDS
    for bad in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv(storage.TIMEOUT_ENV, bad)
        with pytest.raises(JacpipeError, match=rf"^JACPIPE_STORE_TIMEOUT='{bad}': expected a "
                                               r"number of seconds > 0"):
            Storage(uri)
