"""A worker killed mid-batch: the next worker finishes the batch by itself (nobody opens its status), and while no
worker runs, pages and the API say so instead of estimating a time left."""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from classifier.models import Prediction
from reports.models import Batch, BatchChunk, BatchItem, WorkerHeartbeat
from reports.submission import submit_batch, url_entries
from reports.uploads import NamedBytes
from tests.conftest import HeldImageHandler, image_bytes, start_worker

pytestmark = pytest.mark.django_db(transaction=True)

FAST_RECOVERY = {
    "WBC_LEASE_SECONDS": "3",
    "WBC_WORKER_RECOVERY_SECONDS": "1",
    "WBC_WORKER_HEARTBEAT_SECONDS": "1",
    "WBC_URL_ALLOWED_PRIVATE_HOSTS": "localhost",
    "WBC_URL_FETCH_SECONDS": "90",
}


def _stop(worker) -> None:
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except Exception:
            worker.kill()
            worker.wait(timeout=20)


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_batch_of_a_killed_worker_is_finished_by_the_next_worker_without_anyone_polling(
    settings, technologist, tiny_record, models_dir, held_server
):
    entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(5 * i, 90, 160))) for i in range(40)]
    entries += url_entries([f"{held_server}/held.png"], name_by_url=True)
    batch = submit_batch(technologist, entries, tiny_record, name="Killed mid-batch")
    first = start_worker(settings, models_dir, **FAST_RECOVERY)
    second = None
    try:
        # The files are classified first; then the worker waits on the held download: kill it there.
        assert HeldImageHandler.arrived.wait(180), "the worker never reached the URL"
        batch.refresh_from_db()
        assert batch.status == Batch.Status.RUNNING and batch.attempts == 1
        assert batch.items.filter(status=BatchItem.Status.DONE).count() == 40
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        first.wait(timeout=20)
        HeldImageHandler.release.set()
        second = start_worker(settings, models_dir, **FAST_RECOVERY)  # at once: the dead lease is still fresh

        def finished() -> bool:
            batch.refresh_from_db()
            return batch.is_finished

        _wait_for(finished, 180, "the batch to finish")  # reads the database only: no status page, no API
        print(f"finished {time.monotonic() - killed_at:.1f} s after the kill (lease 3 s, worker start included)")
    finally:
        HeldImageHandler.release.set()
        _stop(first)
        if second is not None:
            _stop(second)
    assert batch.status == Batch.Status.DONE, batch.error
    assert batch.attempts == 2 and batch.error == ""
    assert batch.items.filter(status=BatchItem.Status.DONE, prediction__isnull=False).count() == 41
    assert Prediction.objects.count() == 41  # nothing classified twice


def test_pages_and_the_api_say_when_no_worker_is_running(settings, tech_client, technologist, tiny_record, models_dir):
    from rest_framework.test import APIClient

    from accounts.models import ApiToken

    settings.WBC_WORKER_STALE_SECONDS = 2
    entries = [NamedBytes(f"c{i}.png", image_bytes()) for i in range(2)]
    batch = submit_batch(technologist, entries, tiny_record, name="Waiting")
    # Half done, held by some worker (a lease far from expiring, so the worker below leaves it alone).
    started = timezone.now() - timedelta(seconds=30)
    Batch.objects.filter(pk=batch.pk).update(status=Batch.Status.RUNNING, started_at=started)
    batch.chunks.update(
        status=BatchChunk.Status.RUNNING, lease=uuid.uuid4(), heartbeat_at=timezone.now() + timedelta(hours=1)
    )
    BatchItem.objects.filter(pk=batch.items.first().pk).update(status=BatchItem.Status.DONE)
    worker = start_worker(settings, models_dir, WBC_WORKER_HEARTBEAT_SECONDS="1")
    status_url = reverse("reports:batch_status", args=[batch.uid])
    _token, key = ApiToken.issue(technologist, "LIS")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    try:
        _wait_for(lambda: WorkerHeartbeat.objects.filter(stopped_at__isnull=True).exists(), 120, "a heartbeat")
        alive = tech_client.get(status_url).json()
        assert alive["worker_warning"] == "" and alive["eta_seconds"] > 0
        assert api.get(reverse("api:batch-detail", args=[batch.uid])).json()["worker_warning"] is None
        assert tech_client.get(reverse("healthz")).status_code == 200
        os.kill(worker.pid, signal.SIGKILL)  # no clean stop: only the heartbeat's age tells
        worker.wait(timeout=20)
    finally:
        _stop(worker)
    last_seen = WorkerHeartbeat.objects.get().last_seen
    since = f"No worker is running since {timezone.localtime(last_seen):%H:%M}"
    _wait_for(lambda: tech_client.get(status_url).json()["worker_warning"], 10, "the heartbeat to go stale")
    status = tech_client.get(status_url).json()
    assert status["worker_warning"].startswith(since) and status["status"] == "running"
    assert status["eta_seconds"] is None  # no growing estimate while nothing works on it
    page = tech_client.get(reverse("reports:batch", args=[batch.uid])).text
    assert since in page
    detail = api.get(reverse("api:batch-detail", args=[batch.uid])).json()
    assert detail["worker_warning"].startswith(since) and detail["progress"]["eta_seconds"] is None
    ready = tech_client.get(reverse("readyz"))
    assert ready.status_code == 503 and ready.json()["checks"]["worker"]["ok"] is False
    assert ready.json()["checks"]["worker"]["detail"].startswith(since)
