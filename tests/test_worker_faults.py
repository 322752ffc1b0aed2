"""Several real worker processes on one large batch, and the faults they must survive: a worker killed with
``kill -9``, a worker stopped with SIGTERM mid-chunk, PostgreSQL restarted mid-batch. Every time the batch
finishes and every image has exactly one prediction.

A batch's image URL served by a local server that holds the first request until the test lets it go pins a
worker inside a known chunk, so "mid-chunk" is a fact the test sees, not a timing guess.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from reports.models import Batch, BatchChunk, BatchItem, WorkerHeartbeat
from reports.submission import submit_batch, url_entries
from reports.uploads import NamedBytes
from tests.conftest import TINY_SIZE, HeldImageHandler, image_bytes, start_worker, test_database_url, unavailable
from wbc_ml.checksums import file_sha256

pytestmark = [pytest.mark.postgresql, pytest.mark.django_db(transaction=True)]

FAST = {
    "WBC_LEASE_SECONDS": "3",
    "WBC_WORKER_RECOVERY_SECONDS": "1",
    "WBC_WORKER_HEARTBEAT_SECONDS": "1",
    "WBC_CHUNK_SIZE": "20",
    "WBC_URL_ALLOWED_PRIVATE_HOSTS": "localhost",
    "WBC_URL_FETCH_SECONDS": "60",
    "WBC_BATCH_URL_BUDGET_SECONDS": "90",
    "WBC_ONNX_THREADS": "1",
}


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model_file, tmp_path_factory) -> Path:
    """The tiny model's ONNX copy: the workers serve it as production does (and start without TensorFlow)."""
    from wbc_ml.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(tiny_model_file, path, TINY_SIZE, {"method": "scale01"})
    return path


@pytest.fixture
def onnx_record(tiny_record, tiny_onnx, settings):
    settings.WBC_ONNX_DIR = tiny_onnx.parent
    tiny_record.onnx_file_name, tiny_record.onnx_sha256 = tiny_onnx.name, file_sha256(tiny_onnx)
    tiny_record.save(update_fields=["onnx_file_name", "onnx_sha256"])
    return tiny_record


def _workers(settings, models_dir, count: int, **env: str) -> list[subprocess.Popen]:
    return [
        start_worker(settings, models_dir, **FAST, WBC_ONNX_DIR=str(settings.WBC_ONNX_DIR), **env) for _ in range(count)
    ]


@pytest.fixture
def held_url(held_server) -> str:
    return f"{held_server}/held.png"


def _batch(user, record, settings, url: str, *, files: int, url_position: int) -> Batch:
    """``files`` generated images with one held URL at ``url_position``, in chunks of 20."""
    settings.WBC_CHUNK_SIZE = int(FAST["WBC_CHUNK_SIZE"])
    entries: list = [NamedBytes(f"cell{i}.png", image_bytes(color=(i % 256, 90, 160))) for i in range(files)]
    entries.insert(url_position, url_entries([url], name_by_url=True)[0])
    return submit_batch(user, entries, record, name="Large slide")


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stop(*workers) -> None:
    for worker in workers:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(timeout=20)


def _holder(batch: Batch, url_position: int) -> BatchChunk:
    """The chunk with the held URL (its worker waits on the download)."""
    return batch.chunks.get(first_position__lte=url_position, end_position__gt=url_position)


def _pinned(batch: Batch, url_position: int, workers: list) -> tuple[BatchChunk, subprocess.Popen, subprocess.Popen]:
    """Once a worker waits on the held URL: (its chunk, that worker, the other one)."""
    assert HeldImageHandler.arrived.wait(180), "no worker reached the URL"
    _wait_for(lambda: _holder(batch, url_position).worker_id != "", 30, "the holder's id")
    holder = _holder(batch, url_position)
    pid = WorkerHeartbeat.objects.get(worker_id=holder.worker_id).pid
    pinned = next(worker for worker in workers if worker.pid == pid)
    return holder, pinned, next(worker for worker in workers if worker is not pinned)


def _assert_every_image_classified_once(batch: Batch, total: int) -> None:
    from classifier.models import Prediction

    batch.refresh_from_db()
    assert batch.status == Batch.Status.DONE, batch.error
    assert batch.items.filter(status=BatchItem.Status.DONE, prediction__isnull=False).count() == total
    assert Prediction.objects.count() == total  # nothing classified twice, nothing lost
    assert not batch.chunks.exclude(status=BatchChunk.Status.DONE).exists()


def test_two_workers_share_a_batch_and_one_stopped_with_sigterm_gives_its_chunk_back(
    settings, technologist, onnx_record, models_dir, held_url
):
    batch = _batch(technologist, onnx_record, settings, held_url, files=199, url_position=5)
    first, second = _workers(settings, models_dir, 2)
    try:
        holder, stopped, other = _pinned(batch, 5, [first, second])
        # While one worker waits inside chunk 0, the other classifies the rest of the batch: they share it.
        _wait_for(
            lambda: batch.chunks.filter(status="done").exclude(worker_id=holder.worker_id).count() >= 2,
            120,
            "the other worker to finish chunks",
        )
        assert holder.status == BatchChunk.Status.RUNNING and holder.attempts == 1
        stopped.send_signal(signal.SIGTERM)
        # It gives its chunk back at its next look (the download is left to end by itself), then exits cleanly.
        _wait_for(lambda: _holder(batch, 5).lease != holder.lease, 30, "the chunk to be released")
        HeldImageHandler.release.set()
        assert stopped.wait(timeout=60) == 0
        assert not BatchChunk.objects.filter(worker_id=holder.worker_id, status=BatchChunk.Status.RUNNING).exists()
        _wait_for(lambda: Batch.objects.get(pk=batch.pk).is_finished, 120, "the batch to finish")
        assert other.poll() is None  # still running, ready for more
    finally:
        HeldImageHandler.release.set()
        _stop(first, second)
    _assert_every_image_classified_once(batch, 200)
    chunk = _holder(batch, 5)
    assert chunk.worker_id != holder.worker_id  # finished by the other worker
    assert chunk.attempts == 1  # a chunk given back is not a failed attempt


def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(
    settings, technologist, onnx_record, models_dir, held_url
):
    batch = _batch(technologist, onnx_record, settings, held_url, files=299, url_position=30)
    first, second = _workers(settings, models_dir, 2)
    try:
        holder, killed, survivor = _pinned(batch, 30, [first, second])
        # the killed worker has stored the chunk's files before the URL: its results are kept, never redone
        assert batch.items.filter(position__in=range(20, 30), status=BatchItem.Status.DONE).count() == 10
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=20)
        HeldImageHandler.release.set()
        # The dead lease expires (3 s); the survivor's recovery hands the chunk to it, which does only the rest.
        _wait_for(lambda: Batch.objects.get(pk=batch.pk).is_finished, 180, "the batch to finish")
        assert survivor.poll() is None
    finally:
        HeldImageHandler.release.set()
        _stop(first, second)
    _assert_every_image_classified_once(batch, 300)
    chunk = _holder(batch, 30)
    assert chunk.attempts == 2 and chunk.worker_id != holder.worker_id
    assert batch.attempts == 2  # the batch shows the most attempts a chunk needed


# --- PostgreSQL restarted mid-batch ---------------------------------------------------------------------------------


def _postgres_tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        unavailable(f"{name} not found (PostgreSQL's server programs): needed for a throw-away cluster")
    return found


class ThrowawayPostgres:
    """A PostgreSQL cluster of the test's own, in a temporary folder on a free port; never the machine's server."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _postgres_tool("initdb"), _postgres_tool("pg_ctl")
        # in /tmp itself: the postgres account cannot enter pytest's root-only folders
        self.folder = folder = Path(tempfile.mkdtemp(prefix="wbc-pg-"))
        self.data = folder / "data"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        # initdb refuses to run as root: as root, the cluster belongs to the postgres account
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_owner:
            shutil.chown(folder, "postgres")

    def _run(self, *command: str) -> None:
        subprocess.run([*self.as_owner, *command], check=True, capture_output=True, timeout=120)

    def create(self) -> None:
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        self.start()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start")

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"


def _copy_database(source_url: str, target: ThrowawayPostgres) -> str:
    """The test database (schema, the batch and its queued tasks) copied into the throw-away cluster."""
    pg_dump, psql = shutil.which("pg_dump"), shutil.which("psql")
    if not (pg_dump and psql):
        unavailable("pg_dump and psql are needed to copy the test database into a throw-away cluster")
    subprocess.run([psql, target.url(), "-qc", "CREATE DATABASE wbc"], check=True, capture_output=True, timeout=60)
    dump = subprocess.run([pg_dump, "--no-owner", source_url], check=True, capture_output=True, timeout=120).stdout
    subprocess.run([psql, target.url("wbc"), "-q", "-v", "ON_ERROR_STOP=1"], input=dump, check=True, timeout=120)
    return target.url("wbc")


def _batch_state(url: str, batch_id: int) -> tuple[str, int, int, int] | None:
    """(status, items with a prediction, predictions, the most attempts of a chunk) in the throw-away database; None
    while it is unreachable."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            status = conn.execute("SELECT status FROM reports_batch WHERE id = %s", [batch_id]).fetchone()[0]
            linked = conn.execute(
                "SELECT count(*) FROM reports_batchitem WHERE batch_id = %s AND prediction_id IS NOT NULL", [batch_id]
            ).fetchone()[0]
            predictions = conn.execute("SELECT count(*) FROM classifier_prediction").fetchone()[0]
            attempts = conn.execute("SELECT max(attempts) FROM reports_batchchunk WHERE batch_id = %s", [batch_id])
    except psycopg.OperationalError:
        return None
    return status, linked, predictions, attempts.fetchone()[0]


def test_the_worker_carries_on_after_postgresql_restarts_mid_batch(
    settings, technologist, onnx_record, models_dir, held_url
):
    from django.db import connection

    if connection.vendor != "postgresql":
        unavailable("needs the PostgreSQL test database")
    cluster = ThrowawayPostgres()
    worker = None
    try:
        cluster.create()
        batch = _batch(technologist, onnx_record, settings, held_url, files=99, url_position=45)
        url = _copy_database(test_database_url(), cluster)
        (worker,) = _workers(settings, models_dir, 1, DATABASE_URL=url)
        assert HeldImageHandler.arrived.wait(180), "the worker never reached the URL"
        assert _batch_state(url, batch.pk)[0] == "running"
        cluster.stop()  # mid-batch, mid-chunk: every connection of the worker breaks
        HeldImageHandler.release.set()  # the worker now needs the database to store the download
        time.sleep(3)  # it meets the outage and waits it out
        assert worker.poll() is None, worker.stdout.read()
        cluster.start()
        _wait_for(lambda: (_batch_state(url, batch.pk) or ("",))[0] == "done", 120, "the batch to finish")
        assert worker.poll() is None  # it carried on, no restart needed
        # every image once, nothing doubled; the interrupted take of the chunk counts as an attempt
        assert _batch_state(url, batch.pk) == ("done", 100, 100, 2)
    finally:
        HeldImageHandler.release.set()
        _stop(worker)
        cluster.remove()
