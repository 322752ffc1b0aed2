"""The background worker's side of batches: claiming chunks, classifying them, finishing batches, recovering.

A batch is split into chunks (:mod:`reports.chunks`), one task each, so several workers on several hosts share
a large batch. A task first *claims* its chunk with a conditional UPDATE (queued, or running with an expired
lease) that must change exactly one row, marks the batch running, and renews the chunk's lease after every
sub-batch it stores, so a worker that dies mid-chunk leaves a lease that expires; ``recover_stale_chunks`` (run
by the worker itself when it starts and every ``WBC_WORKER_RECOVERY_SECONDS``, never by a page or API request)
hands such a chunk to a new task, which processes only the items still pending. The one-to-one link from item
to prediction, re-checked under each store's transaction, makes a second result for the same image impossible.
Whoever finishes the last chunk marks the batch done, once (a conditional UPDATE), and sends ``batch_finished``.

Every claim counts an attempt on the chunk (the batch shows the most any chunk needed): a task that raises puts
the chunk back in the queue with the error, and after ``WBC_BATCH_MAX_ATTEMPTS`` attempts (a task that keeps
failing, or a worker that keeps dying on the chunk) the batch is failed with the last error instead of being
retried forever. A worker asked to stop (SIGTERM) stores the sub-batch in hand and *releases* its chunk (back in
the queue, lease cleared, a new task; not a failed attempt); a worker that lost the database mid-chunk releases it
too once the database answers again (that attempt counts, so a fault that keeps coming back cannot loop forever).

Order of work in a chunk: its bundle of uploaded images is unpacked into the items' files (:mod:`reports.bundles`),
its stored files are classified, then its URLs are downloaded (:mod:`reports.url_items`, within the time budget),
then what was downloaded is classified.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from functools import cache

import numpy as np
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import Exists, F, OuterRef, Q, Subquery
from django.db.models.functions import Greatest
from django.utils import timezone

from classifier.models import Prediction
from classifier.services import new_prediction
from wbc_ml.inference import ModelUnavailable, get_classifier
from wbc_ml.preprocessing import ImageRejected, decode_image, resize

from .bundles import unpack_chunk
from .chunks import ChunkLease, enqueue_chunks, ensure_chunks
from .file_pool import file_pool
from .models import Batch, BatchChunk, BatchItem
from .signals import send_batch_finished
from .tasks_queue import chunks_waiting_for_a_task
from .thumbnails import make_thumbnail, stored_thumbnails
from .url_items import fetch_url_items
from .wakeup import PROGRESS, notify

logger = logging.getLogger(__name__)
SUB_BATCH = 32  # images per ONNX Runtime call and per stored transaction
FIRST_SUB_BATCH = 8  # the first sub-batch of a chunk is smaller, so inference starts after a few images are decoded
DATABASE_DOWN = (OperationalError, InterfaceError)  # the database went away (restarted, network): not the chunk's fault
RELEASE_TRIES = 8  # after a database outage, tries (with a growing pause, about a minute in all) to give a chunk back
NOT_CLAIMED = "not claimed (finished, failed, or another worker holds it)"
LOST = "lease lost to another worker; stopped"
RELEASED = "released"

# Set when the worker process is asked to stop (SIGTERM): the chunk in hand is released after its current sub-batch.
stopping = threading.Event()


class _Stop(Exception):
    """The chunk is given back (the worker is stopping): not an error."""


def _claimable() -> Q:
    stale = timezone.now() - timedelta(seconds=settings.WBC_LEASE_SECONDS)
    return Q(status=BatchChunk.Status.QUEUED) | Q(status=BatchChunk.Status.RUNNING, heartbeat_at__lt=stale)


def _claim(chunk_id: int, worker_id: str) -> ChunkLease | None:
    """Atomically take the chunk if it is queued, or running with an expired lease (one more attempt).

    A claimable chunk that has used up its attempts fails its batch here instead, with the last error.
    """
    lease = uuid.uuid4()
    now = timezone.now()
    claimed = BatchChunk.objects.filter(_claimable(), pk=chunk_id, attempts__lt=settings.WBC_BATCH_MAX_ATTEMPTS).update(
        status=BatchChunk.Status.RUNNING, lease=lease, heartbeat_at=now, attempts=F("attempts") + 1, worker_id=worker_id
    )
    if claimed != 1:
        _give_up(chunk_id)
        return None
    chunk = BatchChunk.objects.only("batch_id", "attempts").get(pk=chunk_id)
    Batch.objects.filter(pk=chunk.batch_id, status__in=[Batch.Status.QUEUED, Batch.Status.RUNNING]).update(
        status=Batch.Status.RUNNING, attempts=Greatest(F("attempts"), chunk.attempts)
    )
    Batch.objects.filter(pk=chunk.batch_id, started_at__isnull=True).update(started_at=now)
    return ChunkLease(chunk_id, lease)


def _give_up(chunk_id: int) -> None:
    chunk = BatchChunk.objects.filter(_claimable(), pk=chunk_id, attempts__gte=settings.WBC_BATCH_MAX_ATTEMPTS).first()
    if chunk is None:
        return
    last = chunk.error or "the worker stopped while classifying it each time (killed, or out of memory?)"
    _fail_batch(chunk.batch_id, f"Stopped after {chunk.attempts} attempts. Last error: {last}")


def _fail_batch(batch_id: int, error: str) -> None:
    """Fail the batch with ``error``, and its unfinished chunks with it (a worker still on one loses its lease)."""
    now = timezone.now()
    with transaction.atomic():
        failed = Batch.objects.filter(pk=batch_id, status__in=[Batch.Status.QUEUED, Batch.Status.RUNNING]).update(
            status=Batch.Status.FAILED, finished_at=now, error=error[:5000]
        )
        BatchChunk.objects.filter(
            batch_id=batch_id, status__in=[BatchChunk.Status.QUEUED, BatchChunk.Status.RUNNING]
        ).update(status=BatchChunk.Status.FAILED, lease=None)
    if failed:
        logger.error("batch %s failed: %s", batch_id, error)


def _after_error(lease: ChunkLease, exc: Exception) -> None:
    """A task raised: queue the chunk again with the error, after a back-off (``WBC_BATCH_RETRY_SECONDS``, doubled
    at each attempt), or fail the batch when its attempts are used up."""
    chunk = BatchChunk.objects.filter(pk=lease.chunk_id, lease=lease.lease).first()
    if chunk is None:
        return  # another worker holds it now
    message = f"{exc}" or type(exc).__name__
    if chunk.attempts >= settings.WBC_BATCH_MAX_ATTEMPTS:
        _fail_batch(chunk.batch_id, f"Stopped after {chunk.attempts} attempts. Last error: {message}")
        return
    error = f"Attempt {chunk.attempts} of {settings.WBC_BATCH_MAX_ATTEMPTS} failed: {message}"[:5000]
    requeued = BatchChunk.objects.filter(pk=chunk.pk, lease=lease.lease).update(
        status=BatchChunk.Status.QUEUED, lease=None, error=error, queued_at=timezone.now()
    )
    if requeued:
        Batch.objects.filter(pk=chunk.batch_id, status=Batch.Status.RUNNING).update(error=error)
        enqueue_chunks([chunk.pk], delay_seconds=settings.WBC_BATCH_RETRY_SECONDS * 2 ** max(0, chunk.attempts - 1))


def _release(lease: ChunkLease, *, error: str = "") -> bool:
    """Give the chunk back unfinished: queued again, lease cleared, a new task queued.

    Without ``error`` (the worker is stopping) the take does not count as an attempt. With it (the database went
    away mid-chunk) it does, so a fault that keeps coming back ends in a failed batch rather than an endless loop.
    """
    changes = {"attempts": Greatest(F("attempts") - 1, 0)} if not error else {"error": error[:5000]}
    released = BatchChunk.objects.filter(pk=lease.chunk_id, lease=lease.lease).update(
        status=BatchChunk.Status.QUEUED, lease=None, heartbeat_at=None, queued_at=timezone.now(), **changes
    )
    if released:
        enqueue_chunks([lease.chunk_id])
    return bool(released)


def _release_after_outage(lease: ChunkLease, exc: Exception) -> bool:
    """The database went away mid-chunk: wait (bounded) until it answers, then give the chunk back.

    When it stays away, the chunk keeps its lease; once that expires, recovery hands the chunk to a worker.
    """
    pause = 0.5
    for _ in range(RELEASE_TRIES):
        connection.close()  # a broken connection is never reused; the next query opens a new one
        try:
            return _release(lease, error=f"The database was unavailable: {exc}")
        except DATABASE_DOWN as again:
            logger.warning("chunk %s: database still unavailable (%s); again in %.1f s", lease.chunk_id, again, pause)
            time.sleep(pause)
            pause = min(pause * 2, 15.0)
    return False


def process_chunk_now(chunk_id: int, worker_id: str = "") -> str:
    """Classify the chunk's pending items; safe to run twice, and after a crash."""
    lease = _claim(chunk_id, worker_id)
    if lease is None:
        return NOT_CLAIMED
    try:
        return _process(lease)
    except _Stop:
        return RELEASED if _release(lease) else LOST
    except DATABASE_DOWN as exc:
        logger.warning("chunk %s: the database went away (%s)", chunk_id, exc)
        if _release_after_outage(lease, exc):
            return f"{RELEASED} after a database outage: {exc}"
        raise
    except Exception as exc:
        logger.exception("chunk %s: the task failed", chunk_id)
        _after_error(lease, exc)
        raise  # the task itself is recorded as failed, with its traceback
    except (SystemExit, KeyboardInterrupt):  # stopped at once (a second SIGTERM): give the chunk back if we can
        _release(lease)
        raise
    finally:
        notify(PROGRESS)  # whatever happened, anyone watching the batch looks again


def process_batch_now(batch_id: int, worker_id: str = "") -> str:
    """Run every unfinished chunk of the batch in this process, in order (tests, tasks queued before chunks)."""
    batch = Batch.objects.get(pk=batch_id)
    ensure_chunks(batch)
    chunk_ids = list(batch.chunks.exclude(status=BatchChunk.Status.DONE).values_list("pk", flat=True))
    outcomes = [process_chunk_now(chunk_id, worker_id) for chunk_id in chunk_ids]
    if all(outcome == NOT_CLAIMED for outcome in outcomes):
        return NOT_CLAIMED
    batch.refresh_from_db(fields=["status", "error"])
    if batch.status == Batch.Status.DONE:
        return "done"
    if batch.status == Batch.Status.FAILED:
        return f"failed: {batch.error}"
    return "; ".join(sorted(set(outcomes)))


def _process(lease: ChunkLease) -> str:
    chunk = BatchChunk.objects.select_related("batch__model", "batch__user").get(pk=lease.chunk_id)
    batch = chunk.batch
    record = batch.model
    try:
        classifier = get_classifier(record.spec(batch.normalization or None))
    except ModelUnavailable as exc:
        _fail_batch(batch.pk, str(exc))
        return f"failed: {exc}"
    items = batch.items.filter(position__gte=chunk.first_position, position__lt=chunk.end_position)
    unpacked = unpack_chunk(chunk, items, lease)
    if unpacked is None or not _classify_pending(batch, items, lease, classifier, unpacked):
        return LOST
    if not fetch_url_items(batch, items, lease, stopping.is_set):
        return LOST
    if not _classify_pending(batch, items, lease, classifier):  # what was downloaded
        return LOST
    if stopping.is_set() and items.filter(status=BatchItem.Status.PENDING).exists():
        raise _Stop
    finished = BatchChunk.objects.filter(pk=chunk.pk, lease=lease.lease).update(
        status=BatchChunk.Status.DONE, lease=None, heartbeat_at=timezone.now(), error=""
    )
    if not finished:
        return LOST
    _finish_batch(batch.pk)
    return "done"


def _finish_batch(batch_id: int) -> bool:
    """Mark the batch done if every chunk is done: one conditional UPDATE, so exactly one worker succeeds."""
    unfinished = BatchChunk.objects.filter(batch_id=OuterRef("pk")).exclude(status=BatchChunk.Status.DONE)
    done = (
        Batch.objects.filter(pk=batch_id, status=Batch.Status.RUNNING)
        .exclude(Exists(unfinished))
        .update(status=Batch.Status.DONE, finished_at=timezone.now(), error="")
    )
    if done:
        transaction.on_commit(lambda: send_batch_finished(batch_id))  # e.g. lis sends an AI-only result
    return bool(done)


def _load(
    item: BatchItem, size: tuple[int, int], data: bytes | None = None
) -> tuple[np.ndarray, tuple[int, int], bytes | None] | str:
    """(model-sized pixels, original width and height, the gallery's thumbnail), or the reason the stored file is
    unusable. ``data``: the file's bytes when the worker has them already (it has just stored them)."""
    try:
        if data is None:
            with item.image.open("rb") as handle:
                data = handle.read()
        image = decode_image(data, name=item.original_filename)
    except (ImageRejected, OSError) as exc:
        return str(exc)
    return resize(image, size), image.size, make_thumbnail(image)


@cache
def _inference_thread() -> ThreadPoolExecutor:
    """One thread per process that classifies sub-batches (ONNX Runtime releases the GIL while it computes), so the
    task's own thread stores one sub-batch while the next is classified: the cores never wait for the database."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-inference")


def sub_batches(pending: list, size: int, first: int) -> list[list]:
    """``pending`` in sub-batches of ``size``, the first of at most ``first`` (inference starts sooner)."""
    head = min(first, size)
    if not pending:
        return []
    return [pending[:head]] + [pending[start : start + size] for start in range(head, len(pending), size)]


@dataclass(frozen=True)
class _Classified:
    loaded: list  # per item: (pixels, size, thumbnail) or why its stored file is unusable
    good: list  # (item, loaded) of the images classified
    results: list  # their results, in the same order
    per_image_ms: float


def _classify_part(part: list[BatchItem], decoding: list[Future], classifier) -> _Classified:
    """Wait for the sub-batch's decoded images and classify them (on the inference thread: no database here)."""
    started = time.perf_counter()
    loaded = [future.result() for future in decoding]
    good = [(item, out) for item, out in zip(part, loaded, strict=True) if not isinstance(out, str)]
    results = classifier.predict_each(np.stack([pixels for _, (pixels, *_) in good])) if good else []
    loaded, good, results = _fail_non_finite(part, loaded, good, results)
    return _Classified(loaded, good, results, (time.perf_counter() - started) * 1000.0 / len(part))


def _classify_pending(batch: Batch, items, lease: ChunkLease, classifier, contents: dict | None = None) -> bool:
    """Classify the pending stored images among ``items`` in sub-batches; False when the lease was lost.
    ``contents``: the bytes of stored files the worker already has, by item (they are not read again).

    Raises :class:`_Stop` between sub-batches once the worker is asked to stop. Two sub-batches are in flight: while
    this thread stores one, the inference thread classifies the next and the file pool decodes the one after.
    Whatever is in flight when the chunk stops (lease lost, stop, error) is dropped unstored.
    """
    record = batch.model
    pending = list(
        items.filter(status=BatchItem.Status.PENDING, prediction__isnull=True).exclude(image="").order_by("position")
    )
    parts = sub_batches(pending, SUB_BATCH, FIRST_SUB_BATCH)
    pool = file_pool()
    known = dict(contents or {})  # each entry is dropped once handed to its decoding: memory shrinks as it goes

    def start(part: list[BatchItem]) -> tuple[list[Future], Future]:
        decoding = [pool.submit(_load, item, record.input_size, known.pop(item.pk, None)) for item in part]
        return decoding, _inference_thread().submit(_classify_part, part, decoding, classifier)

    in_flight = deque(start(part) for part in parts[:2])
    try:
        for index, part in enumerate(parts):
            if stopping.is_set():
                raise _Stop
            classified = in_flight.popleft()[1].result()
            if index + 2 < len(parts):
                in_flight.append(start(parts[index + 2]))
            stored = _store_part(
                batch, lease, part, classified.loaded, classified.good, classified.results, classified.per_image_ms
            )
            if not stored:
                return False
            if index + 1 < len(parts):  # after the last one, the task's end notifies (the batch may be done by then)
                notify(PROGRESS)
    finally:
        for decoding, classifying in in_flight:
            classifying.cancel()
            for future in decoding:
                future.cancel()
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


def _store_part(batch, lease: ChunkLease, items, loaded, good, results, per_image_ms) -> bool:
    """Record one sub-batch's outcomes in one transaction, if this worker still holds the chunk's lease; False when it
    does not (any more). Its thumbnails are written first and deleted again unless that transaction links them."""
    with stored_thumbnails() as thumbnails:
        # Written before the transaction, so no transaction or row lock waits on the storage (S3: a round trip each).
        thumbnails.save_all([(item, thumb) for item, (_, _, thumb) in good])
        linked = _link_part(batch, lease, items, loaded, good, results, per_image_ms, thumbnails)
    # Outside the block: once committed, a failure here must never take back the thumbnails that were linked.
    thumbnails.keep_only(linked or set())  # those of items not linked (lease lost, or already done) go again
    return linked is not None and lease.renew()


def _link_part(batch, lease: ChunkLease, items, loaded, good, results, per_image_ms, thumbnails) -> set[int] | None:
    """The transaction of :func:`_store_part`: outcomes, predictions and links, under the chunk's lease; the items
    linked to a new prediction, or None when this worker no longer holds the lease (nothing stored)."""
    record = batch.model
    with transaction.atomic():
        # Locks the chunk's row until the commit: a worker that takes it over after an expiry waits for this store.
        if not BatchChunk.objects.select_for_update().filter(pk=lease.chunk_id, lease=lease.lease).exists():
            return None
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
        todo = [(item, size, result) for (item, (_, size, _)), result in zip(good, results, strict=True)]
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
            for item, size, result in todo
        ]
        Prediction.objects.bulk_create(predictions)  # primary keys come back (RETURNING) on SQLite and PostgreSQL
        if todo:
            # One UPDATE links each item to its new prediction, found by the stored file they share, and its thumbnail.
            new = Prediction.objects.filter(pk__in=[p.pk for p in predictions], image=OuterRef("image"))
            BatchItem.objects.filter(pk__in=[item.pk for item, *_ in todo]).update(
                prediction=Subquery(new.values("pk")[:1]), status=BatchItem.Status.DONE, thumbnail=thumbnails.column()
            )
        return {item.pk for item, *_ in todo}


def recover_stale_chunks() -> list[int]:
    """Re-enqueue chunks whose worker died (expired lease) or whose task never ran; called by the worker only.

    A chunk that already has a task waiting in the queue is left alone, so calling this often adds nothing twice.
    An unfinished batch without chunks (queued before chunks existed) gets its chunks first.
    """
    for batch in Batch.objects.filter(status__in=[Batch.Status.QUEUED, Batch.Status.RUNNING], chunks__isnull=True):
        ensure_chunks(batch)
    stale = timezone.now() - timedelta(seconds=settings.WBC_LEASE_SECONDS)
    candidates = BatchChunk.objects.filter(
        Q(status=BatchChunk.Status.RUNNING, heartbeat_at__lt=stale)
        | Q(status=BatchChunk.Status.QUEUED, queued_at__lt=stale)
    ).select_related("batch")
    waiting = chunks_waiting_for_a_task()
    recovered = []
    for chunk in candidates:
        if chunk.pk in waiting:
            continue
        logger.warning("re-enqueuing chunk %s of batch %s (%s) left unfinished", chunk.index, chunk.batch_id, chunk)
        recovered.append(chunk.pk)
    enqueue_chunks(recovered)
    return recovered
