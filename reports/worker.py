"""The background worker's side of batches: claiming, classifying in chunks, and recovering.

A batch is processed by a task that first *claims* it with a conditional UPDATE (queued, or running
with an expired lease) that must change exactly one row. The holder renews its lease after every
chunk, so a worker that dies mid-batch leaves a lease that expires; ``recover_stale_batches`` (run
when a worker starts, and by the status poll) hands such a batch to a new task, which processes only
the items still pending. The one-to-one link from item to prediction makes a second result for the
same image impossible.
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
from django.db.models import OuterRef, Q, Subquery
from django.utils import timezone

from classifier.models import Prediction
from classifier.services import new_prediction
from wbc_ml.inference import ModelUnavailable, get_classifier
from wbc_ml.preprocessing import ImageRejected, decode_image, resize

from .models import Batch, BatchItem
from .submission import DECODE_WORKERS, enqueue
from .thumbnails import make_thumbnail, stored_thumbnails
from .wakeup import PROGRESS, notify

logger = logging.getLogger(__name__)
CHUNK = 32


def _claim(batch_id: int) -> uuid.UUID | None:
    """Atomically take the batch if it is queued, or running with an expired lease."""
    lease = uuid.uuid4()
    now = timezone.now()
    stale = now - timedelta(seconds=settings.WBC_LEASE_SECONDS)
    claimed = Batch.objects.filter(
        Q(status=Batch.Status.QUEUED) | Q(status=Batch.Status.RUNNING, heartbeat_at__lt=stale), pk=batch_id
    ).update(status=Batch.Status.RUNNING, lease=lease, heartbeat_at=now)
    if claimed != 1:
        return None
    Batch.objects.filter(pk=batch_id, started_at__isnull=True).update(started_at=now)
    return lease


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
        return "not claimed (finished, or another worker holds it)"
    try:
        return _process(batch_id, lease)
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
    pending = list(batch.items.filter(status=BatchItem.Status.PENDING, prediction__isnull=True).order_by("position"))
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
            results = classifier.predict(np.stack([pixels for _, (pixels, *_) in good])) if good else []
            per_image_ms = (time.perf_counter() - started) * 1000.0 / len(items)
            if not _store_chunk(batch, lease, items, loaded, good, results, per_image_ms):
                for future in upcoming:
                    future.cancel()
                return "lease lost to another worker; stopped"
            if index + 1 < len(chunks):
                notify(PROGRESS)
    Batch.objects.filter(pk=batch_id, lease=lease).update(status=Batch.Status.DONE, finished_at=timezone.now())
    return "done"


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
    """Re-enqueue batches whose worker died (expired lease) or whose task never ran."""
    stale = timezone.now() - timedelta(seconds=settings.WBC_LEASE_SECONDS)
    batch_ids = list(
        Batch.objects.filter(
            Q(status=Batch.Status.RUNNING, heartbeat_at__lt=stale) | Q(status=Batch.Status.QUEUED, created_at__lt=stale)
        ).values_list("pk", flat=True)
    )
    for batch in Batch.objects.filter(pk__in=batch_ids):
        logger.warning("re-enqueuing batch %s (%s) left unfinished", batch.pk, batch.name)
        enqueue(batch)
    return batch_ids
