"""A batch's chunks: made at submission, queued as tasks, held by one worker at a time.

A batch of N pending images becomes ``ceil(N / WBC_CHUNK_SIZE)`` chunks of nearly equal size (100 images with
a chunk size of 96 are two chunks of 50, not 96 and 4), each a range of item positions and one
``reports.tasks.process_chunk`` task, so every idle worker, on any host, can take one. The queue's depth (chunks
queued and running) is counted for monitoring in :func:`reports.metrics.queue_depth`.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from .models import Batch, BatchChunk, BatchItem
from .wakeup import WORKER, notify


def chunk_ranges(positions: list[int], size: int) -> list[tuple[int, int]]:
    """(first position, one past the last) of each chunk of the sorted ``positions``, in nearly equal parts."""
    if not positions:
        return []
    parts = math.ceil(len(positions) / max(1, size))
    bounds = [round(i * len(positions) / parts) for i in range(parts + 1)]
    return [(positions[bounds[i]], positions[bounds[i + 1] - 1] + 1) for i in range(parts)]


def planned_chunks(pending_positions: list[int]) -> list[tuple[int, int]]:
    """The (first position, one past the last) of each chunk a batch with these pending items gets."""
    return chunk_ranges(sorted(pending_positions), settings.WBC_CHUNK_SIZE)


def make_chunks(batch: Batch, pending_positions: list[int], bundles: list[str] | None = None) -> list[BatchChunk]:
    """Store the chunks of ``batch`` covering its pending items (call inside the submitting transaction), with the
    stored bundle of each (:mod:`reports.bundles`, in the order of :func:`planned_chunks`) when there are any."""
    ranges = planned_chunks(pending_positions)
    names = bundles or [""] * len(ranges)
    chunks = [
        BatchChunk(batch=batch, index=index, first_position=first, end_position=end, bundle=name)
        for index, ((first, end), name) in enumerate(zip(ranges, names, strict=True))
    ]
    return BatchChunk.objects.bulk_create(chunks)


def ensure_chunks(batch: Batch) -> None:
    """Make the chunks of an unfinished batch that has none (a re-run, or a batch queued before chunks existed)."""
    if batch.is_finished or batch.chunks.exists():
        return
    pending = batch.items.filter(status=BatchItem.Status.PENDING).values_list("position", flat=True)
    try:
        with transaction.atomic():
            make_chunks(batch, list(pending))
    except IntegrityError:  # another process made them at the same moment
        pass


def enqueue_chunks(chunk_ids: list[int], delay_seconds: float = 0.0) -> None:
    """One task per chunk (to run ``delay_seconds`` from now, or at once), then one wake-up for the waiting workers."""
    from .tasks import process_chunk

    task = (
        process_chunk.using(run_after=timezone.now() + timedelta(seconds=delay_seconds))
        if delay_seconds
        else process_chunk
    )
    for chunk_id in chunk_ids:
        task.enqueue(chunk_id)
    if chunk_ids:
        notify(WORKER)


@dataclass(frozen=True)
class ChunkLease:
    """What a worker holds while it works on a chunk: the chunk and the lease it took it with."""

    chunk_id: int
    lease: uuid.UUID

    def held(self) -> Q:
        """A filter on items (or anything with a ``batch``) that is empty once this lease is lost."""
        return Q(batch__chunks__pk=self.chunk_id, batch__chunks__lease=self.lease)

    def is_held(self) -> bool:
        return BatchChunk.objects.filter(pk=self.chunk_id, lease=self.lease).exists()

    def renew(self) -> bool:
        """Push the lease's expiry on; False when another worker has taken the chunk (stop at once)."""
        return BatchChunk.objects.filter(pk=self.chunk_id, lease=self.lease).update(heartbeat_at=timezone.now()) == 1
