"""Is a background worker running? Each worker writes a heartbeat row; pages, the API and /readyz read them.

A worker writes its row when it starts and every ``WBC_WORKER_HEARTBEAT_SECONDS`` while it runs (also while it
classifies a long batch), and marks it stopped when it ends cleanly. A worker whose newest heartbeat is older
than ``WBC_WORKER_STALE_SECONDS`` (or that stopped) is not running: a queued or running batch then waits, and the
pages and the API say so ("No worker is running since 14:02") instead of a growing time-left estimate.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from .models import Batch, WorkerHeartbeat

KEEP_DAYS = 7  # rows of workers gone longer than this are removed when a worker starts


@dataclass(frozen=True)
class WorkerState:
    alive: bool
    last_seen: datetime | None  # the newest sign of life of any worker (None: no worker ever ran)

    @property
    def message(self) -> str:
        """'' while a worker runs; else one sentence for people."""
        if self.alive:
            return ""
        if self.last_seen is None:
            return "No worker is running (none has started yet): batches wait until one is started."
        since = timezone.localtime(self.last_seen)
        when = f"{since:%H:%M}" if since.date() == timezone.localdate() else f"{since:%Y-%m-%d %H:%M}"
        return f"No worker is running since {when}: batches wait until one is started."

    def as_dict(self) -> dict:
        return {
            "running": self.alive,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "message": self.message,
        }


def worker_state() -> WorkerState:
    """One query while a worker runs (its row is the newest); a second only when the newest row has stopped."""
    newest = WorkerHeartbeat.objects.order_by("-last_seen").only("last_seen", "stopped_at").first()
    if newest is None:
        return WorkerState(alive=False, last_seen=None)
    fresh = timezone.now() - timedelta(seconds=settings.WBC_WORKER_STALE_SECONDS)
    if newest.stopped_at is None:  # every other row is older, so alive exactly when this one is fresh
        return WorkerState(alive=newest.last_seen >= fresh, last_seen=newest.last_seen)
    running = WorkerHeartbeat.objects.filter(stopped_at__isnull=True, last_seen__gte=fresh).exists()
    return WorkerState(alive=running, last_seen=newest.stopped_at or newest.last_seen)


def worker_warning(batch: Batch) -> str:
    """'' unless ``batch`` waits for a worker that is not running (then the sentence to show)."""
    if batch.is_finished:
        return ""
    return worker_state().message


def beat(worker_id: str, started_at: datetime) -> None:
    """This worker process is alive (one UPDATE, or an INSERT the first time)."""
    now = timezone.now()
    WorkerHeartbeat.objects.update_or_create(
        worker_id=worker_id,
        defaults={"host": socket.gethostname()[:255], "pid": os.getpid(), "started_at": started_at, "last_seen": now},
    )


def stopped(worker_id: str) -> None:
    now = timezone.now()
    WorkerHeartbeat.objects.filter(worker_id=worker_id).update(stopped_at=now, last_seen=now)


def forget_old_workers() -> int:
    cutoff = timezone.now() - timedelta(days=KEEP_DAYS)
    return WorkerHeartbeat.objects.filter(last_seen__lt=cutoff).delete()[0]
