"""A local S3 endpoint for tests: moto's threaded server on 127.0.0.1 over HTTP, reached through the standard AWS
environment variables (boto3 is only used to create buckets; nothing is patched).

Use from any test module::

    from s3_server import s3_env  # noqa: F401  (session-scoped fixture; import makes it available)

    def test_x(s3_env):
        uri = s3_env.new_prefix("my-test")   # "s3://lgff-test/<unique>/my-test"
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import pytest

BUCKET = "lgff-test"
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Env:
    endpoint: str
    bucket: str

    def new_prefix(self, name: str = "data") -> str:
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:10]}/{name}"

    def env(self) -> dict[str, str]:
        """The environment a subprocess needs to reach this endpoint."""
        return dict(FAKE_ENV, AWS_ENDPOINT_URL=self.endpoint)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_env():
    """Start moto's S3 server once per session, create the test bucket, point the AWS env vars at it."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in list(FAKE_ENV) + ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                                                               "AWS_SESSION_TOKEN"]}
    os.environ.update(FAKE_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=FAKE_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=FAKE_ENV["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=BUCKET)
        yield S3Env(endpoint=endpoint, bucket=BUCKET)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
