"""The multi-process stack that ``benchmarks/load.py`` starts on loopback and tears down.

PostgreSQL (a throw-away database of its own on the machine's server), S3 (moto in server mode), gunicorn over
HTTPS with N web processes, and M background workers: the deployment of ``docs/deploy.md`` on one host, so a load
test measures the multi-host code paths (S3 storage, LISTEN/NOTIFY or polling, the shared throttle counters)
rather than the embedded SQLite default. Every child runs in its own process group and is killed on the way out,
also on Ctrl+C or SIGTERM; only the database this module created is ever dropped.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
START_TIMEOUT_S = 180  # the longest wait for one service to answer (gunicorn imports Django and the app first)
STOP_TIMEOUT_S = 20  # SIGTERM, then SIGKILL after this many seconds


class StackError(RuntimeError):
    """A service of the stack did not start; the message names it and where its log is."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, name: str, log: Path, timeout: float = START_TIMEOUT_S):
    """Wait until something accepts TCP connections on 127.0.0.1:port, or fail with the child's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{name} exited with {process.returncode}; see {log}:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise StackError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {log}:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- memory -----------------------------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc), e.g. gunicorn's web processes under its arbiter."""
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for task in tasks for c in (task / "children").read_text().split()]
    except OSError:
        return []


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM, the peak resident set of one process, in MB (None once the process is gone)."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


# --- children ---------------------------------------------------------------------------------------------------


@dataclass
class Children:
    """Every child process started, in its own process group; :meth:`stop_all` ends them (last started first)."""

    logs: Path
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            args,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - children start from the main thread before any other
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.processes.append((name, process))
        return process

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def stop_all(self) -> None:
        with shielded():
            self._stop_all()

    def _stop_all(self) -> None:
        for _, process in reversed(self.processes):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT_S)
        self.processes.clear()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when this script dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not glibc: the process groups are still stopped on every normal exit
        pass


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # the child leads its own group: its own children go too
    except ProcessLookupError:
        pass


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_unwind() -> Iterator[None]:
    """Ctrl+C, SIGTERM and SIGHUP unwind as KeyboardInterrupt, so every ``finally`` runs and no child is left
    behind (SIGINT too, even where a shell started this script with it ignored)."""

    def interrupt(signum, _frame):
        if _TEARDOWN.is_set():
            print("Stopping the stack; please wait.", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_TEARDOWN = threading.Event()


@contextmanager
def shielded() -> Iterator[None]:
    """Within this block a stop signal is ignored (see :func:`signals_unwind`): a second Ctrl+C cannot cut a
    teardown short and leave children or the database behind."""
    _TEARDOWN.set()
    try:
        yield
    finally:
        _TEARDOWN.clear()


# --- services ---------------------------------------------------------------------------------------------------


@contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """A fresh database on the PostgreSQL server at ``server_url`` (its own random name), dropped afterwards."""
    import psycopg

    name = f"wbc_load_{os.getpid()}_{secrets.token_hex(4)}"
    parts = urlsplit(server_url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with shielded(), psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def forget_redis_keys(url: str, prefix: str) -> None:
    """Delete this run's keys (cache and rate counters: ``prefix`` and ``prefix-rate``) from the Redis it used."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)


def start_moto(children: Children, env: dict[str, str]) -> str:
    """moto's S3 API as a real HTTP server on loopback; returns its endpoint URL."""
    port = free_port()
    process = children.start("moto", [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env)
    wait_for_port(port, process, "moto", children.log("moto"))
    return f"http://127.0.0.1:{port}"


def create_bucket(endpoint: str, bucket: str, env: dict[str, str]) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=env["AWS_S3_REGION_NAME"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=bucket)


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, as scripts/run makes one."""
    cert, key = folder / "localhost.crt", folder / "localhost.key"
    subprocess.run(
        [
            *"openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost".split(),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def manage(env: dict[str, str], *args: str, timeout: float = 900) -> str:
    done = subprocess.run(
        [PYTHON, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode:
        raise StackError(f"manage.py {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


@dataclass
class Stack:
    """A running stack: where to reach it and the processes to measure."""

    base_url: str
    cert: Path
    env: dict[str, str]
    web_master: subprocess.Popen
    workers: list[subprocess.Popen]
    children: Children

    def web_pids(self) -> list[int]:
        return children_of(self.web_master.pid)

    def check_alive(self) -> None:
        for name, process in self.children.processes:
            if process.poll() is not None:
                raise StackError(f"{name} exited with {process.returncode}; see {self.children.log(name)}")


S3_ENV = {  # moto accepts any credentials; these are for the throw-away bucket only
    "AWS_S3_REGION_NAME": "us-east-1",
    "AWS_ACCESS_KEY_ID": "load-benchmark",
    "AWS_SECRET_ACCESS_KEY": "load-benchmark",
    "AWS_S3_ADDRESSING_STYLE": "path",
}


def stack_env(workdir: Path, database_url: str, api_rate: str) -> dict[str, str]:
    """The environment every process of the stack shares (as every host of a deployment would)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "wbcsite.settings",
        "DATABASE_URL": database_url,
        "SECRET_KEY": secrets.token_urlsafe(50),
        "MEDIA_ROOT": str(workdir / "media"),  # unused with S3; kept out of the checkout all the same
        "WBC_ONNX_DIR": str(workdir / "onnx"),
        "WBC_CUSTOM_MODELS_DIR": str(workdir / "custom-models"),
        "WBC_MODEL_CACHE_DIR": str(workdir / "model-cache"),
        "WBC_WORKER_WAKEUP_DIR": str(workdir / "wakeup"),
        "WBC_API_RATE": api_rate,
        "WBC_API_SUBMIT_RATE": api_rate,
        "AXES_ENABLED": "0",
        "LOG_LEVEL": "WARNING",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    for name in ("REDIS_URL", "WBC_ENV", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_STORAGE_BUCKET_NAME"):
        env.pop(name, None)  # nothing of the caller's own deployment
    return env


@contextmanager
def running_stack(
    workdir: Path,
    *,
    postgres: str,
    web_processes: int,
    threads: int,
    workers: int,
    onnx_threads: int,
    api_rate: str,
    s3: bool = True,
    redis: str = "",
) -> Iterator[Stack]:
    """Start the whole stack in ``workdir`` (logs in ``workdir/logs``); everything is stopped and dropped after.
    Without ``s3`` files stay in folders under ``workdir`` (the single-host default), to see what S3 costs. With a
    ``redis`` URL the cache and the rate counters are there (under a key prefix of this run's own) instead of in
    PostgreSQL."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:
        database_url = cleanup.enter_context(throwaway_database(postgres))
        env = stack_env(workdir, database_url, api_rate)
        children = Children(logs)
        cleanup.callback(children.stop_all)
        if redis:
            env.update(REDIS_URL=redis, WBC_REDIS_KEY_PREFIX=f"wbc-load-{uuid.uuid4().hex[:12]}")
            cleanup.callback(forget_redis_keys, redis, env["WBC_REDIS_KEY_PREFIX"])
        if s3:
            env.update(S3_ENV, AWS_STORAGE_BUCKET_NAME=f"wbc-load-{uuid.uuid4().hex[:12]}")
            env["AWS_S3_ENDPOINT_URL"] = start_moto(children, env)
            create_bucket(env["AWS_S3_ENDPOINT_URL"], env["AWS_STORAGE_BUCKET_NAME"], env)
        manage(env, "migrate", "--noinput")
        manage(env, "createcachetable")
        manage(env, "register_models")
        cert, key = make_certificate(workdir)
        port = free_port()
        web = children.start(
            "web",
            [
                *(PYTHON, "-m", "gunicorn", "wbcsite.wsgi:application", "--bind", f"127.0.0.1:{port}"),
                *("--certfile", str(cert), "--keyfile", str(key), "--workers", str(web_processes)),
                *("--worker-class", "gthread", "--threads", str(threads), "--timeout", "120", "--access-logfile", "-"),
            ],
            env,
        )
        worker_env = {**env, "WBC_ONNX_THREADS": str(onnx_threads)}  # read by the worker where the setting exists
        worker_processes = [
            children.start(f"worker-{i + 1}", [PYTHON, "manage.py", "run_worker"], worker_env) for i in range(workers)
        ]
        wait_for_port(port, web, "gunicorn", children.log("web"))
        yield Stack(f"https://127.0.0.1:{port}", cert, env, web, worker_processes, children)
