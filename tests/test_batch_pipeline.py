"""The worker's pipeline inside a chunk: a small first sub-batch, then full ones; while one sub-batch is stored the
next is already classified on the inference thread, and what is in flight when the chunk stops is never stored."""

from __future__ import annotations

import threading
import uuid

import pytest

from classifier.models import Prediction
from reports import worker as batches
from reports.models import Batch, BatchChunk, BatchItem
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from reports.worker import process_batch_now, sub_batches
from tests.conftest import image_bytes
from tests.workers import after_each_stored_part

pytestmark = pytest.mark.django_db


def _entries(n: int) -> list[NamedBytes]:
    return [NamedBytes(f"cell{i}.png", image_bytes(color=(20 * i % 255, 90, 160))) for i in range(n)]


def test_sub_batches_start_small_then_fill_up():
    assert [len(part) for part in sub_batches(list(range(100)), 32, 8)] == [8, 32, 32, 28]
    assert [len(part) for part in sub_batches(list(range(5)), 2, 8)] == [2, 2, 1]  # never above the size
    assert sub_batches(list(range(5)), 32, 8) == [[0, 1, 2, 3, 4]]
    assert sub_batches([], 32, 8) == []
    parts = sub_batches(list(range(70)), 32, 8)
    assert [i for part in parts for i in part] == list(range(70))  # every image once, in order


def test_sub_batches_are_classified_on_the_inference_thread_and_stored_on_the_tasks_own(
    technologist, tiny_record, monkeypatch
):
    batch = submit_batch(technologist, _entries(7), tiny_record, name="Pipelined")
    monkeypatch.setattr(batches, "SUB_BATCH", 3)
    monkeypatch.setattr(batches, "FIRST_SUB_BATCH", 1)
    seen = {"classified": set(), "stored": set()}
    real_classify, real_store = batches._classify_part, batches._store_part

    def classify(*args):
        seen["classified"].add(threading.current_thread().name)
        return real_classify(*args)

    def store(*args):
        seen["stored"].add(threading.current_thread().name)
        return real_store(*args)

    monkeypatch.setattr(batches, "_classify_part", classify)
    monkeypatch.setattr(batches, "_store_part", store)
    assert process_batch_now(batch.pk) == "done"
    assert seen["stored"] == {threading.current_thread().name}
    assert len(seen["classified"]) == 1 and seen["classified"] != seen["stored"]
    assert batch.items.filter(status=BatchItem.Status.DONE, prediction__isnull=False).count() == 7
    assert Prediction.objects.count() == 7


def test_a_lost_lease_stores_nothing_of_the_sub_batches_already_in_flight(technologist, tiny_record, monkeypatch):
    batch = submit_batch(technologist, _entries(7), tiny_record, name="Taken over")
    chunk = batch.chunks.get()
    monkeypatch.setattr(batches, "SUB_BATCH", 2)
    # another worker takes the chunk over as soon as the first sub-batch is stored
    after_each_stored_part(monkeypatch, lambda: BatchChunk.objects.filter(pk=chunk.pk).update(lease=uuid.uuid4()))
    assert batches.process_chunk_now(chunk.pk) == batches.LOST
    # The first sub-batch was stored; the second, classified meanwhile, and the rest are left to the new holder.
    assert batch.items.filter(status=BatchItem.Status.DONE).count() == 2
    assert batch.items.filter(status=BatchItem.Status.PENDING, prediction__isnull=True).count() == 5
    assert Prediction.objects.count() == 2
    batch.refresh_from_db()
    assert batch.status == Batch.Status.RUNNING
