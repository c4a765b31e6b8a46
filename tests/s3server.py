"""A real S3-compatible endpoint on 127.0.0.1 (moto's server in a thread), for tests.

Register with ``pytest_plugins = ["tests.s3server"]`` in ``conftest.py``.

One server per session (start-up ~0.3 s); every test that asks for ``s3_server``
gets a fresh, empty bucket and, at teardown, that bucket is emptied and deleted.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

HOST = "127.0.0.1"
ACCESS_KEY = "jacpipe-test-key"
SECRET_KEY = "jacpipe-test-secret"
REGION = "us-east-1"

_counter = itertools.count()


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 endpoint is and how to log in.

    Attributes:
        endpoint: ``host:port`` (pyarrow's ``endpoint_override``).
        endpoint_url: ``http://host:port`` (boto3's ``endpoint_url``, AWS_ENDPOINT_URL).
        access_key, secret_key, region: the credentials moto accepts.
        bucket: a fresh, empty bucket for this test.
    """

    endpoint: str
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    bucket: str

    def filesystem(self, **kwargs: Any) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` pointed at this server."""
        from pyarrow import fs

        return fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            endpoint_override=self.endpoint,
            scheme="http",
            **kwargs,
        )

    def uri(self, path: str = "") -> str:
        """An ``s3://`` URI with endpoint and credentials, for ``FileSystem.from_uri``."""
        key = f"{self.bucket}/{path}".rstrip("/")
        return (
            f"s3://{self.access_key}:{self.secret_key}@{key}"
            f"?endpoint_override={self.endpoint}&scheme=http&region={self.region}"
        )

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables that make ``FileSystem.from_uri("s3://...")`` use this server.

        ``pyarrow.fs.S3FileSystem()`` built directly ignores ``AWS_ENDPOINT_URL``;
        only ``from_uri`` (and boto3) honour it.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def boto3(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )


@pytest.fixture(scope="session")
def _moto_endpoint() -> Iterator[tuple[str, int]]:
    """Start moto's S3 server on a free port of 127.0.0.1 for the whole session."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield host, int(port)
    finally:
        server.stop()


@pytest.fixture
def s3_server(_moto_endpoint: tuple[str, int]) -> Iterator[S3Server]:
    """A fresh bucket on the session's S3 server; emptied and deleted afterwards."""
    host, port = _moto_endpoint
    server = S3Server(
        endpoint=f"{host}:{port}",
        endpoint_url=f"http://{host}:{port}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region=REGION,
        bucket=f"jacpipe-test-{os.getpid()}-{next(_counter)}",
    )
    client = server.boto3()
    client.create_bucket(Bucket=server.bucket)
    try:
        yield server
    finally:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=server.bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=server.bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=server.bucket)
