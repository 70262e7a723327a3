"""A real S3 endpoint for the tests, as s3fs's own test suite runs one: moto's server mode on a free
local port (plain HTTP, dummy credentials), s3fs as the client. One server per test process; each
module gets its own bucket and the environment memscan reads (AWS_* and MEMSCAN_STORAGE_OPTIONS)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_ENDPOINT: str | None = None
_SERVER: Any = None
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# the environment a test run may carry that would send s3fs elsewhere
_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
          "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def moto_endpoint() -> str:
    """The endpoint of this process's moto server, started on first use."""
    global _ENDPOINT, _SERVER
    if _ENDPOINT is None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stderr
        port = free_port()
        _SERVER = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        _SERVER.start()
        _ENDPOINT = f"http://127.0.0.1:{port}"
    return _ENDPOINT


def storage_env(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the server: dummy credentials, and the endpoint as a storage
    option for s3:// only (memscan.storage's MEMSCAN_STORAGE_OPTIONS; retries kept short)."""
    options = {"s3.endpoint_url": endpoint, "s3.config_kwargs": {"connect_timeout": 2, "retries": {"max_attempts": 1}}}
    return {**CREDENTIALS, "MEMSCAN_STORAGE_OPTIONS": json.dumps(options)}


@dataclass
class S3:
    """A bucket on the moto server and an s3fs client for the test's own checks."""

    endpoint: str
    bucket: str
    fs: Any

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> str:
        self.fs.pipe_file(f"{self.bucket}/{key}", data)
        return self.url(key)

    def get(self, key: str) -> bytes:
        self.fs.invalidate_cache()
        return self.fs.cat_file(f"{self.bucket}/{key}")

    def keys(self, prefix: str) -> list[str]:
        self.fs.invalidate_cache()
        found = self.fs.find(f"{self.bucket}/{prefix}")
        return sorted(k.split("/", 1)[1] for k in found)


@contextmanager
def s3_bucket(name: str = "memscan") -> Iterator[S3]:
    """A fresh bucket, with the environment set for this process and the ones it starts."""
    import pytest
    import s3fs

    endpoint = moto_endpoint()
    with pytest.MonkeyPatch.context() as patch:
        for key in _UNSET:
            patch.delenv(key, raising=False)
        for key, value in storage_env(endpoint).items():
            patch.setenv(key, value)
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)
        bucket = f"{name}-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        yield S3(endpoint, bucket, fs)


@contextmanager
def denying_server() -> Iterator[str]:
    """Another moto server, in its own process, that checks credentials: the dummy ones are refused."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
