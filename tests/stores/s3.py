"""A real S3 API for the tests of stores at URLs: moto's server on 127.0.0.1, spoken to by s3fs over HTTP.

Import the fixtures into a test module (``from tests.stores.s3 import s3, s3_auth  # noqa: F401``); they skip when
s3fs, moto or boto3 are not installed (``pip install -e ".[test]"`` installs them).

- ``s3``: one server per session and one new bucket per test; ``S3.options`` are the storage options s3fs takes
  (``key``, ``secret``, ``client_kwargs.endpoint_url``).
- ``s3_auth``: the same server with request signing and IAM checks switched on for one test (moto's
  ``INITIAL_NO_AUTH_ACTION_COUNT``): ``S3Auth.reader`` holds the options of an IAM user who may list and read
  the bucket but not write to it; the plain ``testing`` key is then unknown (bad credentials).
"""
from __future__ import annotations

import json
import logging
import socket
import uuid
from typing import NamedTuple

import pytest

SECRET = "s3cr3t-never-recorded"
"""The secret key of the tests' storage options: no file a command writes may contain it."""


class S3(NamedTuple):
    endpoint: str
    bucket: str
    options: dict
    """Storage options for s3fs: credentials and the endpoint."""

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options, skip_instance_cache=True, use_listings_cache=False)

    def keys(self) -> list[str]:
        return sorted(self.fs().find(self.bucket))


class S3Auth(NamedTuple):
    s3: S3
    reader: dict
    """Storage options of an IAM user allowed s3:ListBucket and s3:GetObject on the bucket only."""


def options(endpoint: str, key: str = "testing", secret: str = SECRET, **extra) -> dict:
    return {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            **extra}


def closed_port_options() -> dict:
    """Options whose endpoint nothing listens on, with one attempt and a 1 s timeout (botocore's defaults retry
    for ~10 s)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return options(f"http://127.0.0.1:{port}",
                   config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 1})


def _client(endpoint: str, service: str = "s3"):
    import boto3

    return boto3.client(service, endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key=SECRET,
                        region_name="us-east-1")


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("s3fs")
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server) -> S3:
    bucket = f"saeforge-{uuid.uuid4().hex[:12]}"
    _client(s3_server).create_bucket(Bucket=bucket)
    return S3(s3_server, bucket, options(s3_server))


def checks_on(monkeypatch) -> None:
    """From now on (until the test ends) the server checks signatures and IAM permissions: the plain `testing`
    key is unknown to it."""
    import moto.settings
    from moto.core.responses import ActionAuthenticatorMixin

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)


def iam_user(s3: S3, readable: tuple[str, ...] = ("*",)) -> dict:
    """Storage options of a new IAM user allowed to list the bucket and to read its objects whose keys match one of
    ``readable`` (IAM resource patterns), nothing else."""
    iam = _client(s3.endpoint, "iam")
    name = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [f"arn:aws:s3:::{s3.bucket}"]},
        {"Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [f"arn:aws:s3:::{s3.bucket}/{r}" for r in readable]}]}
    iam.put_user_policy(UserName=name, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return options(s3.endpoint, key["AccessKeyId"], key["SecretAccessKey"])


def read_only_user(s3: S3) -> dict:
    """Storage options of a new IAM user allowed s3:ListBucket and s3:GetObject on the bucket only."""
    return iam_user(s3)


@pytest.fixture
def s3_auth(s3, monkeypatch) -> S3Auth:
    reader = read_only_user(s3)
    checks_on(monkeypatch)
    return S3Auth(s3, reader)
