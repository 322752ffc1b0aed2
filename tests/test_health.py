"""/healthz (the process answers) and /readyz (database, media storage, a live worker), without a log-in."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from reports.heartbeat import beat, stopped, worker_state
from reports.models import WorkerHeartbeat
from tests.conftest import start_worker

pytestmark = pytest.mark.django_db(transaction=True)


def test_healthz_answers_without_a_log_in(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"]


def test_readyz_is_503_without_a_worker_and_says_why(client):
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert body["checks"]["database"]["ok"] and body["checks"]["storage"]["ok"]
    assert body["checks"]["worker"] == {
        "ok": False,
        "detail": "No worker is running (none has started yet): batches wait until one is started.",
        "running": False,
        "last_seen": None,
        "message": "No worker is running (none has started yet): batches wait until one is started.",
    }


def test_readyz_is_200_with_a_running_worker_and_leaves_no_probe_file(client, settings, models_dir):
    worker = start_worker(settings, models_dir, WBC_WORKER_HEARTBEAT_SECONDS="1")
    try:
        deadline = time.monotonic() + 120
        while not WorkerHeartbeat.objects.filter(stopped_at__isnull=True).exists():
            assert worker.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        response = client.get(reverse("readyz"))
        assert response.status_code == 200, response.json()
        checks = response.json()["checks"]
        assert all(check["ok"] for check in checks.values()) and checks["worker"]["running"] is True
    finally:
        worker.terminate()
        worker.wait(timeout=20)
    assert WorkerHeartbeat.objects.get().stopped_at is not None  # a clean stop is recorded
    assert not [p for p in settings.MEDIA_ROOT.rglob("*") if p.is_file()]
    assert client.get(reverse("readyz")).status_code == 503  # the worker stopped


def test_readyz_reports_a_broken_media_storage_without_leaking_paths(client, settings, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the media folder should be")
    settings.MEDIA_ROOT = blocker
    response = client.get("/readyz")
    assert response.status_code == 503
    storage = response.json()["checks"]["storage"]
    assert storage["ok"] is False and "media storage failed" in storage["detail"]
    assert str(tmp_path) not in response.content.decode()


@pytest.mark.django_db
def test_the_worker_state_is_one_query_while_a_worker_runs_and_finds_a_running_worker_behind_a_stopped_one(
    django_assert_num_queries,
):
    now = timezone.now()
    beat("older", now - timedelta(minutes=5))  # started first; its row's heartbeat is renewed below
    beat("newer", now)
    with django_assert_num_queries(1):
        assert worker_state().alive
    stopped("newer")  # the newest row is now a worker that stopped, while the older one still runs
    assert worker_state().alive
    WorkerHeartbeat.objects.filter(worker_id="older").update(last_seen=now - timedelta(hours=1))  # went silent
    state = worker_state()
    assert not state.alive and state.last_seen == WorkerHeartbeat.objects.get(worker_id="newer").stopped_at
    WorkerHeartbeat.objects.filter(worker_id="newer").delete()
    with django_assert_num_queries(1):  # the newest row has not stopped, but its heartbeat is stale
        assert not worker_state().alive
