"""A real S3 API on loopback for the tests: moto in server mode, started once per test session as a subprocess.

Nothing is mocked in-process: the app talks HTTP to ``python -m moto.server`` through django-storages and boto3, like
it talks to S3 or MinIO in production. Use the fixtures:

* ``s3_server`` (session): the running server; ``s3_server.new_bucket()`` makes an empty bucket of your own
  (``running_s3_server`` is the same as a context manager, for benchmark scripts).
* ``s3_media`` (per test): a fresh bucket, this process's STORAGES pointed at it the way a host with the S3
  settings is (``wbcsite.settings.storages_config``), and ``s3_media.env`` for the processes the test starts
  (workers, a second "host"); ``s3_media.keys()`` lists what the bucket holds.

:class:`FlakyProxy` is a loopback TCP proxy to put between a process and the server, which can drop every connection
for a while: S3 "down" and back, for fault tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGION = "us-east-1"
START_TIMEOUT_S = 60.0
# Fixed test credentials: moto accepts any. Never real ones, and set explicitly so boto3 looks nowhere else (no
# credentials file, no instance metadata service).
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def s3_env(endpoint: str, bucket: str, **extra: str) -> dict[str, str]:
    """The environment of a host whose storages are this bucket (what ``wbcsite.settings`` reads)."""
    return {
        **CREDENTIALS,
        "AWS_STORAGE_BUCKET_NAME": bucket,
        "AWS_S3_ENDPOINT_URL": endpoint,
        "AWS_S3_REGION_NAME": REGION,
        **extra,
    }


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    log: Path

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=CREDENTIALS["AWS_SESSION_TOKEN"],
        )

    def new_bucket(self) -> str:
        name = f"wbc-test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _wait_until_answering(server: S3Server) -> None:
    """Bounded wait until the server answers a real S3 call; RuntimeError with its log if it does not."""
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"moto server exited ({server.process.returncode}):\n{server.log_tail()}")
        try:
            server.client().list_buckets()
            return
        except (BotoCoreError, ClientError):
            time.sleep(0.2)
    raise RuntimeError(f"moto server did not answer within {START_TIMEOUT_S:g} s:\n{server.log_tail()}")


@contextlib.contextmanager
def running_s3_server(log_dir: Path) -> Iterator[S3Server]:
    """``python -m moto.server`` on a free loopback port while the block runs (for fixtures and benchmark scripts)."""
    port = free_port()
    log = Path(log_dir) / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **CREDENTIALS},
        )
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        _wait_until_answering(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """The S3 API on loopback for the whole test session (stopped at its end)."""
    with running_s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@dataclass
class S3Media:
    server: S3Server
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    def keys(self, prefix: str = "") -> list[str]:
        return self.server.keys(self.bucket, prefix)

    def read(self, key: str) -> bytes:
        return self.server.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        self.server.client().put_object(Bucket=self.bucket, Key=key, Body=data)


@pytest.fixture
def s3_media(s3_server, settings, monkeypatch) -> S3Media:
    """This process as a host with the S3 settings, on a bucket of its own (``env`` for the processes it starts)."""
    from wbcsite.settings import storages_config

    bucket = s3_server.new_bucket()
    env = s3_env(s3_server.endpoint, bucket)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings.STORAGES = {**storages_config(), "staticfiles": settings.STORAGES["staticfiles"]}
    return S3Media(server=s3_server, bucket=bucket, env=env)


class FlakyProxy:
    """A loopback TCP proxy to ``target_port`` that can go down (every connection dropped, new ones reset) and up.

    ``fail_after(requests, seconds)`` takes it down once the clients have sent that many HTTP requests through it
    (counted by request line), and brings it back ``seconds`` later: an outage that starts at a known point of the
    work, not at a guessed time. ``requests_seen`` and ``refused`` say what went through and what was turned away.
    """

    MARKER = b" HTTP/1.1\r\n"

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.requests_seen = 0
        self.refused = 0
        self.requests_after_outage = 0
        self.outage_started = threading.Event()
        self.outage_over = threading.Event()
        self._down = False
        self._trigger: tuple[int, float] | None = None
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def fail_after(self, requests: int, seconds: float) -> None:
        self._trigger = (requests, seconds)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self._drop_all()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._down:
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                self._reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._live.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _reset(self, connection: socket.socket) -> None:
        """Close with RST (linger 0): the client sees its connection reset, as when a load balancer drops it."""
        with self._lock:
            self.refused += 1
        with contextlib.suppress(OSError):
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        connection.close()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        tail = b""
        try:
            while data := source.recv(65536):
                if from_client:
                    window = tail + data
                    tail = window[-(len(self.MARKER) - 1) :]
                    self._count(window.count(self.MARKER))
                if self._down:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
            with self._lock:
                self._live.discard(source)
                self._live.discard(sink)

    def _count(self, requests: int) -> None:
        if not requests:
            return
        with self._lock:
            self.requests_seen += requests
            if self.outage_over.is_set():
                self.requests_after_outage += requests
            start = self._trigger is not None and self.requests_seen >= self._trigger[0]
            seconds = self._trigger[1] if start else 0.0
            if start:
                self._trigger = None
        if start:
            self._go_down(seconds)

    def _go_down(self, seconds: float) -> None:
        self._down = True
        self.outage_started.set()
        self._drop_all()
        timer = threading.Timer(seconds, self._come_back)
        timer.daemon = True
        timer.start()

    def _come_back(self) -> None:
        self._down = False
        self.outage_over.set()

    def _drop_all(self) -> None:
        with self._lock:
            live = list(self._live)
        for connection in live:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
