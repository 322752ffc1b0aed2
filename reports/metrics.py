"""Queue and worker numbers for ``/metrics``, read from the database at scrape time.

The queue and the heartbeats live in the database that every web and worker host shares, so any web process
answers the same numbers; per-process counters could not see another host's worker. Each query is an aggregate on
indexed columns (``BatchItem.status``, ``Batch.status``, ``BatchChunk.status``, ``WorkerHeartbeat.last_seen``); no
row is read into Python except the few heartbeat rows of workers seen in the last hour.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

from django.db.models import Count, Max
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from .models import Batch, BatchChunk, BatchItem, WorkerHeartbeat

WAITING = (Batch.Status.QUEUED, Batch.Status.RUNNING)
CHUNKS_WAITING = (BatchChunk.Status.QUEUED, BatchChunk.Status.RUNNING)
WORKER_WINDOW = timedelta(hours=1)  # a worker silent for longer (crashed, host gone) leaves the per-worker series


@dataclass(frozen=True)
class QueueDepth:
    """Work not yet done: images waiting to be classified, and batches by status (queued, running)."""

    pending_images: int
    batches: dict[str, int] = field(default_factory=dict)
    chunks: dict[str, int] = field(default_factory=dict)  # the units the workers share: queued, running


def queue_depth() -> QueueDepth:
    """Pending images of queued or running batches (a failed batch's leftovers are not waiting), those batches, and
    their chunks (what the workers take: queued ones wait for a worker).

    Three aggregate queries.
    """
    pending = BatchItem.objects.filter(status=BatchItem.Status.PENDING, batch__status__in=WAITING).count()
    by_status = dict(Batch.objects.order_by().filter(status__in=WAITING).values_list("status").annotate(n=Count("pk")))
    chunks = dict(
        BatchChunk.objects.order_by().filter(status__in=CHUNKS_WAITING).values_list("status").annotate(n=Count("pk"))
    )
    return QueueDepth(
        pending_images=pending,
        batches={status.value: by_status.get(status, 0) for status in WAITING},
        chunks={status.value: chunks.get(status, 0) for status in CHUNKS_WAITING},
    )


def heartbeat_ages() -> tuple[dict[tuple[str, str], float], float]:
    """Seconds since each running worker's last heartbeat (by host and pid; workers seen in the last hour that did
    not stop cleanly), and the youngest such age (+Inf when no worker is running)."""
    now = timezone.now()
    running = WorkerHeartbeat.objects.filter(stopped_at__isnull=True)
    rows = running.filter(last_seen__gte=now - WORKER_WINDOW).values_list("host", "pid", "last_seen")
    ages = {(host, str(pid)): max(0.0, (now - seen).total_seconds()) for host, pid, seen in rows}
    newest = running.aggregate(newest=Max("last_seen"))["newest"]
    youngest = max(0.0, (now - newest).total_seconds()) if newest else math.inf
    return ages, youngest


def collect() -> Iterator[Metric]:
    """The queue and worker metric families (used by ``wbcsite.metrics``)."""
    depth = queue_depth()
    yield GaugeMetricFamily(
        "wbc_queue_pending_images",
        "Images of queued or running batches not yet classified.",
        value=depth.pending_images,
    )
    batches = GaugeMetricFamily(
        "wbc_queue_batches", "Batches waiting for or being classified, by status.", labels=["status"]
    )
    for status, count in depth.batches.items():
        batches.add_metric([status], count)
    yield batches
    chunks = GaugeMetricFamily(
        "wbc_queue_chunks", "Chunks of batches waiting for a worker (queued) or being classified.", labels=["status"]
    )
    for status, count in depth.chunks.items():
        chunks.add_metric([status], count)
    yield chunks

    ages, youngest = heartbeat_ages()
    per_worker = GaugeMetricFamily(
        "wbc_worker_heartbeat_age_seconds",
        "Seconds since each running worker's last heartbeat (workers seen in the last hour).",
        labels=["host", "pid"],
    )
    for (host, pid), age in sorted(ages.items()):
        per_worker.add_metric([host, pid], age)
    yield per_worker
    yield GaugeMetricFamily(
        "wbc_worker_heartbeat_youngest_age_seconds",
        "Seconds since the newest heartbeat of any running worker (+Inf: none); above WBC_WORKER_STALE_SECONDS "
        "no worker is classifying.",
        value=youngest,
    )
