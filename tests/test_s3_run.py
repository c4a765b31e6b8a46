"""Results on S3 (moto's server on 127.0.0.1): workers write the parts, readers read them back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.autograd.functional import jacobian
from typer.testing import CliRunner

from pipeline import read_jacobian
from pipeline.cli import app
from pipeline.core.errors import JacpipeError
from pipeline.problem.problem import build_problem
from pipeline.store.manifest import MANIFEST
from pipeline.store.parts import PartWriter, dense_schema
from pipeline.store.reader import open_jacobian
from pipeline.store.storage import Storage

pytest.importorskip("moto.server")

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


# ---------------------------------------------------------------------------
# Storage on an object store
# ---------------------------------------------------------------------------


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
