"""Waiting without polling: the worker is woken when a batch is queued, a status long poll when a chunk is stored."""

import socket
import threading
import time

import pytest
from django.db import connection, transaction
from django.urls import reverse

from reports.models import Batch
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from reports.wakeup import PG_CHANNEL_PREFIX, PROGRESS, WORKER, WakeupSocket, listen, notify, notify_sockets
from reports.worker import process_batch_now
from tests.conftest import image_bytes, start_worker
from wbc_ml.inference import get_classifier


def _someone_listens(settings, channel: str) -> bool:
    """A waiter is bound: a socket file (SQLite), or a session whose last statement was its LISTEN (PostgreSQL)."""
    if connection.vendor != "postgresql":
        return bool(list(settings.WBC_WORKER_WAKEUP_DIR.glob(f"{channel}-*.sock")))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = %s",
            [f'LISTEN "{PG_CHANNEL_PREFIX}{channel}"'],
        )
        return cursor.fetchone()[0] > 0


def test_a_notification_wakes_a_waiting_worker_socket(settings):
    with WakeupSocket() as wakeup:
        assert wakeup.path.parent == settings.WBC_WORKER_WAKEUP_DIR
        assert notify_sockets(WORKER) == 1
        notify_sockets(WORKER)  # two wake-ups before the worker looks count as one
        assert wakeup.wait(30) is True
        assert wakeup.wait(0) is False
        assert notify_sockets(PROGRESS) == 0  # another channel
        assert wakeup.wait(0) is False
    assert not wakeup.path.exists()
    assert notify_sockets(WORKER) == 0


def test_the_socket_of_a_worker_that_died_is_cleared_away(settings):
    settings.WBC_WORKER_WAKEUP_DIR.mkdir(parents=True, exist_ok=True)
    dead = settings.WBC_WORKER_WAKEUP_DIR / "worker-999999.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(dead))
    sock.close()  # the process ended without removing its socket file
    assert notify_sockets(WORKER) == 0
    assert not dead.exists()


@pytest.mark.django_db(transaction=True)
def test_the_running_worker_starts_a_new_batch_when_woken_not_at_its_next_look(
    settings, technologist, tiny_record, models_dir
):
    # The worker looks at the queue unprompted only every 10 minutes: the batch can finish within the
    # three minutes below only because submitting it woke the worker.
    worker = start_worker(settings, models_dir, WBC_WORKER_IDLE_SECONDS="600")
    try:
        lines = iter(worker.stdout.readline, "")  # library warnings may come first (stderr is merged)
        assert any(line.strip() == "worker ready: waiting for batches" for line in lines)
        entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(40 * i, 90, 160))) for i in range(3)]
        batch = submit_batch(technologist, entries, tiny_record, name="Woken")
        deadline = time.monotonic() + 180  # far below the 600 s look; the worker may still load TensorFlow
        while time.monotonic() < deadline:
            batch.refresh_from_db()
            if batch.is_finished:
                break
            time.sleep(0.1)
        assert batch.status == Batch.Status.DONE
        assert batch.items.filter(prediction__isnull=False).count() == 3
    finally:
        worker.terminate()
        worker.wait(timeout=20)


@pytest.mark.django_db(transaction=True)
def test_a_waiting_status_request_answers_when_the_worker_stores_progress(
    settings, tech_client, technologist, tiny_record, monkeypatch
):
    from reports import views

    monkeypatch.setattr(views, "STATUS_RECHECK_SECONDS", 60)  # only a wake-up can end the wait early
    entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(40 * i, 90, 160))) for i in range(3)]
    batch = submit_batch(technologist, entries, tiny_record, name="Watched")
    get_classifier(tiny_record.spec(batch.normalization or None))  # loaded before the wait, as the worker will
    answer = {}
    url = reverse("reports:batch_status", args=[batch.uid])
    request = threading.Thread(target=lambda: answer.update(tech_client.get(url, {"wait": 10, "after": 0}).json()))
    request.start()
    while not _someone_listens(settings, PROGRESS):  # the request is waiting
        assert request.is_alive()
        time.sleep(0.01)
    process_batch_now(batch.pk)
    request.join(timeout=5)  # well before the request's own 10 s deadline
    assert not request.is_alive()
    assert answer["status"] == "done" and answer["done"] == 3


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_on_postgresql_a_notify_reaches_a_listener_when_its_transaction_commits():
    with listen(WORKER) as waiter, listen(PROGRESS) as other:
        assert waiter.conn is not None  # LISTEN on a connection of its own, not a socket
        with transaction.atomic():
            assert notify(WORKER) == 1
            assert waiter.wait(0.3) is False  # not yet: the transaction has not committed
        assert waiter.wait(30) is True
        assert waiter.wait(0) is False  # drained
        assert other.wait(0.1) is False  # another channel
        notify(WORKER)
        notify(WORKER)
        assert waiter.wait(30) is True and waiter.wait(0) is False  # two notifications before a look count as one
