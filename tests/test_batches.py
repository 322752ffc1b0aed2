import io
import zipfile
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.db import IntegrityError
from django.tasks import TaskResultStatus
from django.urls import reverse
from django.utils import timezone
from django_tasks_db.models import DBTaskResult

from classifier.models import Prediction
from reports import worker as batches
from reports.metrics import queue_depth
from reports.models import Batch, BatchChunk, BatchItem
from reports.signals import batch_finished
from reports.submission import submit_batch
from reports.uploads import Limits, NamedBytes, UploadRefused, expand_uploads
from reports.worker import process_batch_now, recover_stale_chunks
from tests.conftest import image_bytes
from tests.workers import after_each_stored_part

pytestmark = pytest.mark.django_db(transaction=True)


def _entries(n=3, bad=0):
    good = [NamedBytes(f"cell{i}.png", image_bytes(color=(40 * i % 256, 100, 200))) for i in range(n)]
    return good + [NamedBytes(f"junk{i}.jpg", b"not an image") for i in range(bad)]


def _run_worker():
    call_command("run_worker", "--batch")


def test_job_life_cycle_queued_running_done(technologist, tiny_record):
    batch = submit_batch(technologist, _entries(3), tiny_record, name="Slide 1")
    assert batch.status == Batch.Status.QUEUED
    assert batch.items.filter(status=BatchItem.Status.PENDING).count() == 3
    _run_worker()
    batch.refresh_from_db()
    assert batch.status == Batch.Status.DONE
    assert batch.started_at and batch.finished_at and batch.started_at <= batch.finished_at
    assert batch.items.filter(status=BatchItem.Status.DONE, prediction__isnull=False).count() == 3
    assert Prediction.objects.filter(batch_item__batch=batch).count() == 3


def test_one_bad_file_never_sinks_a_batch(technologist, tiny_record):
    batch = submit_batch(technologist, _entries(2, bad=1), tiny_record, name="Slide with junk")
    failed = batch.items.get(status=BatchItem.Status.FAILED)
    assert failed.original_filename == "junk0.jpg" and "not a readable image" in failed.error
    assert not failed.image
    _run_worker()
    batch.refresh_from_db()
    assert batch.status == Batch.Status.DONE
    assert batch.items.filter(status=BatchItem.Status.DONE).count() == 2


def test_a_truncated_image_is_stored_and_failed_by_the_worker_with_its_reason(technologist, tiny_record):
    # The submission checks what needs no decoding; the worker decodes every image once and names the damage.
    whole = image_bytes(size=(120, 110), fmt="JPEG")
    entries = [*_entries(2), NamedBytes("half.jpg", whole[: len(whole) // 2])]
    batch = submit_batch(technologist, entries, tiny_record, name="Slide with a truncated file")
    assert batch.items.filter(status=BatchItem.Status.PENDING).count() == 3
    _run_worker()
    batch.refresh_from_db()
    assert batch.status == Batch.Status.DONE
    failed = batch.items.get(status=BatchItem.Status.FAILED)
    assert failed.original_filename == "half.jpg" and "half.jpg: the image is damaged or truncated" in failed.error
    assert failed.prediction is None
    assert batch.items.filter(status=BatchItem.Status.DONE).count() == 2


def test_a_batch_that_cannot_be_stored_leaves_no_files_behind(technologist, tiny_record, settings):
    submit_batch(technologist, _entries(2), tiny_record, name="First", idempotency_key="K-1")
    files_before = sorted(p for p in settings.MEDIA_ROOT.rglob("*") if p.is_file())
    with pytest.raises(IntegrityError):  # the same idempotency key again: the database refuses the batch
        submit_batch(technologist, _entries(3), tiny_record, name="Second", idempotency_key="K-1")
    assert sorted(p for p in settings.MEDIA_ROOT.rglob("*") if p.is_file()) == files_before
    assert Batch.objects.count() == 1 and BatchItem.objects.count() == 2


def test_a_batch_of_only_bad_files_finishes_at_once(technologist, tiny_record):
    batch = submit_batch(technologist, _entries(0, bad=2), tiny_record, name="All junk")
    assert batch.status == Batch.Status.DONE and batch.items.filter(status=BatchItem.Status.FAILED).count() == 2


def test_model_failure_is_recorded_as_data(technologist, tiny_record, models_dir):
    batch = submit_batch(technologist, _entries(2), tiny_record, name="Doomed")
    (models_dir / "tiny.keras").unlink()
    _run_worker()
    batch.refresh_from_db()
    assert batch.status == Batch.Status.FAILED and "missing" in batch.error


class WorkerDied(BaseException):
    """Stands in for a worker process killed mid-batch (not an Exception: nothing catches it)."""


def test_worker_that_died_mid_batch_is_resumed_without_duplicates(technologist, tiny_record, settings, monkeypatch):
    batch = submit_batch(technologist, _entries(5), tiny_record, name="Crashed")
    chunk = batch.chunks.get()  # five images: one chunk
    monkeypatch.setattr(batches, "SUB_BATCH", 2)
    real_store = batches._store_part

    def store_then_die(*args):
        real_store(*args)
        raise WorkerDied

    monkeypatch.setattr(batches, "_store_part", store_then_die)
    with pytest.raises(WorkerDied):
        process_batch_now(batch.pk)
    monkeypatch.setattr(batches, "_store_part", real_store)
    batch.refresh_from_db()
    chunk.refresh_from_db()
    assert batch.status == Batch.Status.RUNNING and chunk.status == BatchChunk.Status.RUNNING
    assert batch.items.filter(status=BatchItem.Status.DONE).count() == 2

    # While the dead worker's lease is fresh nobody else may take the chunk...
    assert process_batch_now(batch.pk).startswith("not claimed")
    assert recover_stale_chunks() == []
    # ...once it has expired the chunk is handed to a new task, which processes only the rest.
    stale = timezone.now() - timedelta(seconds=settings.WBC_LEASE_SECONDS + 1)
    BatchChunk.objects.filter(pk=chunk.pk).update(heartbeat_at=stale)
    assert recover_stale_chunks() == []  # its first task still waits in the queue: nothing is queued twice
    DBTaskResult.objects.update(status=TaskResultStatus.RUNNING)  # as if the dead worker had taken that task
    assert recover_stale_chunks() == [chunk.pk]
    assert recover_stale_chunks() == []  # the new task waits: recovering again adds nothing
    _run_worker()
    batch.refresh_from_db()
    assert batch.status == Batch.Status.DONE and batch.attempts == 2
    assert batch.items.filter(status=BatchItem.Status.DONE, prediction__isnull=False).count() == 5
    assert Prediction.objects.count() == 5  # no image got two results


def test_a_large_batch_is_split_into_chunks_that_each_finish_and_the_last_one_finishes_the_batch(
    technologist, tiny_record, settings
):
    settings.WBC_CHUNK_SIZE = 4
    batch = submit_batch(technologist, _entries(10, bad=1), tiny_record, name="Chunked")
    chunks = list(batch.chunks.order_by("index"))
    # ten good images in three nearly equal chunks (not 4, 4, 2); the refused file needs no chunk
    assert [(c.first_position, c.end_position) for c in chunks] == [(0, 3), (3, 7), (7, 10)]
    assert DBTaskResult.objects.filter(task_path="reports.tasks.process_chunk").count() == 3
    finished = []
    batch_finished.connect(lambda sender, batch, **kw: finished.append(batch.pk), weak=False, dispatch_uid="t")
    try:
        assert batches.process_chunk_now(chunks[1].pk, worker_id="w-1") == "done"
        batch.refresh_from_db()
        assert batch.status == Batch.Status.RUNNING and batch.items.filter(status="done").count() == 4
        assert batches.process_chunk_now(chunks[1].pk) == batches.NOT_CLAIMED  # a chunk is done once
        assert batches.process_chunk_now(chunks[0].pk, worker_id="w-2") == "done"
        assert finished == []
        assert batches.process_chunk_now(chunks[2].pk, worker_id="w-1") == "done"
    finally:
        batch_finished.disconnect(dispatch_uid="t")
    batch.refresh_from_db()
    assert batch.status == Batch.Status.DONE and finished == [batch.pk]
    assert sorted(batch.chunks.values_list("worker_id", flat=True)) == ["w-1", "w-1", "w-2"]
    assert batch.items.filter(status=BatchItem.Status.DONE, prediction__isnull=False).count() == 10
    assert Prediction.objects.count() == 10


def test_the_queue_depth_counts_waiting_chunks_and_images(technologist, tiny_record, settings):
    settings.WBC_CHUNK_SIZE = 3
    batch = submit_batch(technologist, _entries(5), tiny_record, name="Waiting")
    depth = queue_depth()
    assert (depth.chunks, depth.pending_images) == ({"queued": 2, "running": 0}, 5)
    batches.process_chunk_now(batch.chunks.order_by("index").first().pk)  # positions 0 and 1
    depth = queue_depth()
    assert (depth.chunks, depth.pending_images) == ({"queued": 1, "running": 0}, 3)
    assert depth.batches == {"queued": 0, "running": 1}


def test_a_stopping_worker_gives_its_chunk_back_after_the_images_in_hand(technologist, tiny_record, monkeypatch):
    batch = submit_batch(technologist, _entries(5), tiny_record, name="Stopped")
    chunk = batch.chunks.get()
    monkeypatch.setattr(batches, "SUB_BATCH", 2)
    real_store = after_each_stored_part(monkeypatch, batches.stopping.set)  # SIGTERM arrives as two are stored
    try:
        assert process_batch_now(batch.pk) == "released"
    finally:
        batches.stopping.clear()
    chunk.refresh_from_db()
    assert (chunk.status, chunk.lease, chunk.attempts) == (BatchChunk.Status.QUEUED, None, 0)  # not a failed attempt
    assert batch.items.filter(status=BatchItem.Status.DONE).count() == 2
    monkeypatch.setattr(batches, "_store_part", real_store)
    _run_worker()  # the chunk went back to the queue with a new task
    batch.refresh_from_db()
    assert batch.status == Batch.Status.DONE and Prediction.objects.count() == 5


def test_running_a_finished_batch_again_changes_nothing(technologist, tiny_record):
    batch = submit_batch(technologist, _entries(2), tiny_record, name="Twice")
    _run_worker()
    assert process_batch_now(batch.pk).startswith("not claimed")
    assert Prediction.objects.count() == 2


def _zip(files: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


LIMITS = Limits(max_files=50, max_total_bytes=5_000_000, max_file_bytes=1_000_000, max_zip_ratio=100)


def _upload(name, data):
    return SimpleUploadedFile(name, data)


def test_zip_with_nested_folders_and_non_images():
    data = _zip(
        {
            "slide/a/cell1.png": image_bytes(),
            "slide/b/deeper/cell2.jpg": image_bytes(fmt="JPEG"),
            "slide/readme.txt": b"hello",
            "__MACOSX/slide/._cell1.png": b"junk",
            "slide/.DS_Store": b"junk",
        }
    )
    entries = expand_uploads([_upload("slide.zip", data)], LIMITS)
    names = {e.name: e for e in entries}
    assert set(names) == {
        "slide.zip/slide/a/cell1.png",
        "slide.zip/slide/b/deeper/cell2.jpg",
        "slide.zip/slide/readme.txt",
    }
    assert (
        names["slide.zip/slide/readme.txt"].data is None and "not an image" in names["slide.zip/slide/readme.txt"].error
    )
    assert names["slide.zip/slide/a/cell1.png"].data == image_bytes()


def test_zip_bomb_is_refused():
    bomb = _zip({"huge.png": b"\0" * 4_000_000})  # expands thousands-fold
    with pytest.raises(UploadRefused, match="zip bomb"):
        expand_uploads([_upload("bomb.zip", bomb)], LIMITS)


def test_zip_declaring_more_than_the_batch_limit_is_refused():
    data = _zip({f"c{i}.png": b"\0" * 1_000_000 for i in range(6)})  # small archive, 6 MB declared
    lenient_ratio = Limits(max_files=50, max_total_bytes=5_000_000, max_file_bytes=1_000_000, max_zip_ratio=10**6)
    with pytest.raises(UploadRefused, match="would expand to 6 MB"):
        expand_uploads([_upload("big.zip", data)], lenient_ratio)


def test_not_a_zip_is_listed_as_bad():
    entries = expand_uploads([_upload("broken.zip", b"PK\x03\x04garbage")], LIMITS)
    assert entries[0].data is None and "not a readable zip" in entries[0].error


def test_too_many_files_is_refused():
    files = [_upload(f"c{i}.png", image_bytes()) for i in range(4)]
    with pytest.raises(UploadRefused, match="at most 3"):
        expand_uploads(files, Limits(3, 5_000_000, 1_000_000))


def test_batch_page_uploads_files_and_zip_and_lists_bad_ones(tech_client, tiny_record):
    files = [
        _upload("a.png", image_bytes()),
        _upload("b.jpg", image_bytes(fmt="JPEG")),
        _upload("notes.png", b"text"),
        _upload("more.zip", _zip({"x/c.png": image_bytes(color=(10, 10, 10))})),
    ]
    response = tech_client.post(
        reverse("reports:batch_new"), {"name": "Slide 7", "files": files, "model": tiny_record.pk, "urls": ""}
    )
    batch = Batch.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("reports:batch", args=[batch.uid])
    assert batch.items.count() == 4 and batch.items.filter(status=BatchItem.Status.FAILED).count() == 1
    _run_worker()
    page = tech_client.get(response["Location"])
    assert "notes.png" in page.text and "not a readable image" in page.text
    status = tech_client.get(reverse("reports:batch_status", args=[batch.uid])).json()
    assert status == {
        "status": "done", "done": 3, "failed": 1, "total": 4, "eta_seconds": None, "error": "", "worker_warning": ""
    }  # fmt: skip


def test_status_long_poll_answers_with_the_progress_it_has(tech_client, technologist, tiny_record):
    batch = submit_batch(technologist, _entries(3), tiny_record, name="Watched")
    url = reverse("reports:batch_status", args=[batch.uid])
    unchanged = tech_client.get(url, {"wait": "0.2", "after": "0"}).json()  # nothing moved: answers at the deadline
    assert unchanged["status"] == "queued" and unchanged["done"] == 0 and unchanged["total"] == 3
    assert tech_client.get(url, {"wait": "nan", "after": "many"}).json()["total"] == 3  # odd values: no wait
    _run_worker()
    finished = tech_client.get(url, {"wait": "10", "after": "0"}).json()
    assert finished["status"] == "done" and finished["done"] == 3


def test_batch_page_refuses_too_many_files_with_a_message(tech_client, tiny_record, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 2
    settings.WBC_BATCH_MAX_FILES = 2
    files = [_upload(f"c{i}.png", image_bytes()) for i in range(3)]
    response = tech_client.post(
        reverse("reports:batch_new"), {"name": "Too many", "files": files, "model": tiny_record.pk}
    )
    assert response.status_code == 400 and "Too many files: at most 2" in response.text
    assert Batch.objects.count() == 0


def test_batch_page_with_nothing_chosen(tech_client, tiny_record):
    response = tech_client.post(reverse("reports:batch_new"), {"name": "Empty", "model": tiny_record.pk})
    assert response.status_code == 400 and "No files were chosen" in response.text


def test_batch_url_refusals_become_failed_items(tech_client, tiny_record):
    response = tech_client.post(
        reverse("reports:batch_new"),
        {
            "name": "URLs",
            "files": [_upload("a.png", image_bytes())],
            "model": tiny_record.pk,
            "urls": "http://127.0.0.1/cell.png\nftp://example.org/x.png",
        },
    )
    batch = Batch.objects.get()
    assert response.status_code == 302
    errors = list(batch.items.filter(status=BatchItem.Status.FAILED).values_list("error", flat=True))
    assert len(errors) == 2 and any("loopback" in e for e in errors) and any("http and https" in e for e in errors)


def test_other_lab_cannot_see_a_batch(client, technologist, outsider, tiny_record):
    batch = submit_batch(technologist, _entries(1), tiny_record, name="Private slide")
    client.force_login(outsider)
    for name in ("reports:batch", "reports:batch_status", "reports:batch_csv", "reports:batch_summary_csv"):
        assert client.get(reverse(name, args=[batch.uid])).status_code == 404
    assert "Private slide" not in client.get(reverse("reports:batches")).text
