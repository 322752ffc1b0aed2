"""The background worker's side of batches: claiming, classifying in chunks, and recovering.

A batch is processed by a task that first *claims* it with a conditional UPDATE (queued, or running
with an expired lease) that must change exactly one row. The holder renews its lease after every
chunk, so a worker that dies mid-batch leaves a lease that expires; ``recover_stale_batches`` (run by
the worker itself when it starts and every ``WBC_WORKER_RECOVERY_SECONDS``, never by a page or API
request) hands such a batch to a new task, which processes only the items still pending. The
one-to-one link from item to prediction makes a second result for the same image impossible.

Every claim counts an attempt: a task that raises puts the batch back in the queue with the error, and
after ``WBC_BATCH_MAX_ATTEMPTS`` attempts (a task that keeps failing, or a worker that keeps dying on
the batch) the batch is failed with the last error instead of being retried forever.

Order of work: the stored files first, then the batch's URLs are downloaded (:mod:`reports.url_items`,
within the batch's time budget), then what was downloaded is classified.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import F, OuterRef, Q, Subquery
from django.utils import timezone

from classifier.models import Prediction
from classifier.services import new_prediction
from wbc_ml.inference import ModelUnavailable, get_classifier
from wbc_ml.preprocessing import ImageRejected, decode_image, resize

from .models import Batch, BatchItem
from .signals import send_batch_finished
from .submission import DECODE_WORKERS, enqueue
from .tasks_queue import batches_waiting_for_a_task
from .thumbnails import make_thumbnail, stored_thumbnails
from .url_items import fetch_url_items
from .wakeup import PROGRESS, notify

logger = logging.getLogger(__name__)
CHUNK = 32


def _claimable() -> Q:
    stale = timezone.now() - timedelta(seconds=settings.WBC_LEASE_SECONDS)
    return Q(status=Batch.Status.QUEUED) | Q(status=Batch.Status.RUNNING, heartbeat_at__lt=stale)


def _claim(batch_id: int) -> uuid.UUID | None:
    """Atomically take the batch if it is queued, or running with an expired lease (one more attempt).

    A claimable batch that has used up its attempts is failed here instead, with the last error.
    """
    lease = uuid.uuid4()
    now = timezone.now()
    claimed = Batch.objects.filter(_claimable(), pk=batch_id, attempts__lt=settings.WBC_BATCH_MAX_ATTEMPTS).update(
        status=Batch.Status.RUNNING, lease=lease, heartbeat_at=now, attempts=F("attempts") + 1
    )
    if claimed != 1:
        _give_up(batch_id)
        return None
    Batch.objects.filter(pk=batch_id, started_at__isnull=True).update(started_at=now)
    return lease


def _give_up(batch_id: int) -> None:
    batch = Batch.objects.filter(_claimable(), pk=batch_id, attempts__gte=settings.WBC_BATCH_MAX_ATTEMPTS).first()
    if batch is None:
        return
    last = batch.error or "the worker stopped while classifying it each time (killed, or out of memory?)"
    _stop_for_good(Batch.objects.filter(_claimable(), pk=batch_id), batch.attempts, last)


def _stop_for_good(batches, attempts: int, last_error: str) -> None:
    """Fail the batch (a queryset of it, with the condition the caller needs) with its last error."""
    if batches.update(
        status=Batch.Status.FAILED,
        lease=None,
        finished_at=timezone.now(),
        error=f"Stopped after {attempts} attempts. Last error: {last_error}"[:5000],
    ):
        logger.error("batch failed after %s attempts: %s", attempts, last_error)


def _after_error(batch_id: int, lease: uuid.UUID, exc: Exception) -> None:
    """A task raised: queue the batch again with the error, or fail it when its attempts are used up."""
    batch = Batch.objects.filter(pk=batch_id, lease=lease).first()
    if batch is None:
        return  # another worker holds it now
    message = f"{exc}" or type(exc).__name__
    if batch.attempts >= settings.WBC_BATCH_MAX_ATTEMPTS:
        _stop_for_good(Batch.objects.filter(pk=batch_id, lease=lease), batch.attempts, message)
        return
    error = f"Attempt {batch.attempts} of {settings.WBC_BATCH_MAX_ATTEMPTS} failed: {message}"[:5000]
    if Batch.objects.filter(pk=batch_id, lease=lease).update(status=Batch.Status.QUEUED, lease=None, error=error):
        enqueue(batch)


def _renew(batch_id: int, lease: uuid.UUID) -> bool:
    return Batch.objects.filter(pk=batch_id, lease=lease).update(heartbeat_at=timezone.now()) == 1


def _load(item: BatchItem, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int], bytes | None] | str:
    """(model-sized pixels, original width and height, the gallery's WebP thumbnail), or the reason the stored
    file is unusable."""
    try:
        with item.image.open("rb") as handle:
            image = decode_image(handle.read(), name=item.original_filename)
    except (ImageRejected, OSError) as exc:
        return str(exc)
    return resize(image, size), image.size, make_thumbnail(image)


def process_batch_now(batch_id: int) -> str:
    """Classify the batch's pending items in chunks; safe to run twice, and after a crash."""
    lease = _claim(batch_id)
    if lease is None:
        return "not claimed (finished, failed, or another worker holds it)"
    try:
        return _process(batch_id, lease)
    except Exception as exc:
        logger.exception("batch %s: the task failed", batch_id)
        _after_error(batch_id, lease, exc)
        raise  # the task itself is recorded as failed, with its traceback
    finally:
        notify(PROGRESS)  # whatever happened, anyone watching the batch looks again


def _process(batch_id: int, lease: uuid.UUID) -> str:
    batch = Batch.objects.select_related("model", "user").get(pk=batch_id)
    record = batch.model
    try:
        classifier = get_classifier(record.spec(batch.normalization or None))
    except ModelUnavailable as exc:
        Batch.objects.filter(pk=batch_id, lease=lease).update(
            status=Batch.Status.FAILED, error=str(exc), finished_at=timezone.now()
        )
        return f"failed: {exc}"
    lost = "lease lost to another worker; stopped"
    if not _classify_pending(batch, lease, classifier):
        return lost
    if not fetch_url_items(batch, lease, lambda: _renew(batch_id, lease)):
        return lost
    if not _classify_pending(batch, lease, classifier):  # what was downloaded
        return lost
    finished = Batch.objects.filter(pk=batch_id, lease=lease).update(
        status=Batch.Status.DONE, finished_at=timezone.now(), error=""
    )
    if not finished:
        return lost
    transaction.on_commit(lambda: send_batch_finished(batch_id))  # e.g. lis sends an AI-only result
    return "done"


def _classify_pending(batch: Batch, lease: uuid.UUID, classifier) -> bool:
    """Classify the batch's pending stored images in chunks; False when the lease was lost."""
    record = batch.model
    pending = list(
        batch.items.filter(status=BatchItem.Status.PENDING, prediction__isnull=True)
        .exclude(image="")
        .order_by("position")
    )
    chunks = [pending[start : start + CHUNK] for start in range(0, len(pending), CHUNK)]
    with ThreadPoolExecutor(max_workers=DECODE_WORKERS) as pool:

        def decode(chunk: list[BatchItem]) -> list:
            return [pool.submit(_load, item, record.input_size) for item in chunk]

        upcoming = decode(chunks[0]) if chunks else []
        for index, items in enumerate(chunks):
            started = time.perf_counter()
            loaded = [future.result() for future in upcoming]
            # The next chunk decodes on the pool while this one is classified and stored.
            upcoming = decode(chunks[index + 1]) if index + 1 < len(chunks) else []
            good = [(item, out) for item, out in zip(items, loaded, strict=True) if not isinstance(out, str)]
            results = classifier.predict_each(np.stack([pixels for _, (pixels, *_) in good])) if good else []
            loaded, good, results = _fail_non_finite(items, loaded, good, results)
            per_image_ms = (time.perf_counter() - started) * 1000.0 / len(items)
            if not _store_chunk(batch, lease, items, loaded, good, results, per_image_ms):
                for future in upcoming:
                    future.cancel()
                return False
            if index + 1 < len(chunks):
                notify(PROGRESS)
    return True


def _fail_non_finite(items, loaded, good, results):
    """An image whose model output is not finite becomes a failed item with the reason (never stored as NaN)."""
    reasons = {
        item.pk: f"{item.original_filename}: {r}"
        for (item, _), r in zip(good, results, strict=True)
        if isinstance(r, str)
    }
    if not reasons:
        return loaded, good, results
    loaded = [reasons.get(item.pk, out) for item, out in zip(items, loaded, strict=True)]
    kept = [(pair, r) for pair, r in zip(good, results, strict=True) if not isinstance(r, str)]
    return loaded, [pair for pair, _ in kept], [r for _, r in kept]


def _store_chunk(batch, lease, items, loaded, good, results, per_image_ms) -> bool:
    """Record one chunk's outcomes in one transaction, if this worker still holds the lease (thumbnail files
    saved in it are deleted again if it fails)."""
    record = batch.model
    with stored_thumbnails() as thumbnails, transaction.atomic():
        if not Batch.objects.filter(pk=batch.pk, lease=lease).exists():
            return False
        for item, outcome in zip(items, loaded, strict=True):
            if isinstance(outcome, str):
                BatchItem.objects.filter(pk=item.pk, status=BatchItem.Status.PENDING).update(
                    status=BatchItem.Status.FAILED, error=outcome[:500]
                )
        # Re-checked under the transaction: an item that already has its result is never done twice.
        finished = set(
            BatchItem.objects.filter(pk__in=[item.pk for item, _ in good], prediction__isnull=False).values_list(
                "pk", flat=True
            )
        )
        todo = [(item, size, thumb, result) for (item, (_, size, thumb)), result in zip(good, results, strict=True)]
        todo = [entry for entry in todo if entry[0].pk not in finished]
        predictions = [
            new_prediction(
                batch.user,
                record,
                normalization=batch.normalization or record.normalization,
                name=item.original_filename,
                size=size,
                result=result,
                processing_ms=per_image_ms,
                image_name=item.image.name,  # the batch's stored file, not a copy
            )
            for item, size, _, result in todo
        ]
        Prediction.objects.bulk_create(predictions)  # primary keys come back (RETURNING) on SQLite and PostgreSQL
        if todo:
            for item, _, thumb, _ in todo:
                thumbnails.save(item, thumb)
            # One UPDATE links each item to its new prediction, found by the stored file they share, and its thumbnail.
            new = Prediction.objects.filter(pk__in=[p.pk for p in predictions], image=OuterRef("image"))
            BatchItem.objects.filter(pk__in=[item.pk for item, *_ in todo]).update(
                prediction=Subquery(new.values("pk")[:1]), status=BatchItem.Status.DONE, thumbnail=thumbnails.column()
            )
        return _renew(batch.pk, lease)


def recover_stale_batches() -> list[int]:
    """Re-enqueue batches whose worker died (expired lease) or whose task never ran; called by the worker only.

    A batch that already has a task waiting in the queue is left alone, so calling this often adds nothing twice.
    """
    stale = timezone.now() - timedelta(seconds=settings.WBC_LEASE_SECONDS)
    candidates = Batch.objects.filter(
        Q(status=Batch.Status.RUNNING, heartbeat_at__lt=stale) | Q(status=Batch.Status.QUEUED, created_at__lt=stale)
    )
    waiting = batches_waiting_for_a_task()
    recovered = []
    for batch in candidates:
        if batch.pk in waiting:
            continue
        logger.warning("re-enqueuing batch %s (%s) left unfinished", batch.pk, batch.name)
        enqueue(batch)
        recovered.append(batch.pk)
    return recovered
