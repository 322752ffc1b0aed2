"""LIS outbox backlog for ``/metrics``: messages not yet delivered, read from the database at scrape time.

The outbox is shared by every host's ``deliver_lis``, so the database is the only place that knows the backlog.
Delivered messages (the vast majority, growing for ever) are never counted: both queries filter on the indexed
``status`` first. No destination names or payloads appear: they are the laboratory's configuration and patients'
results.
"""

from __future__ import annotations

from collections.abc import Iterator

from django.db.models import Count, Min
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from .models import OutboxMessage

UNDELIVERED = (OutboxMessage.Status.PENDING, OutboxMessage.Status.FAILED)


def backlog() -> dict[str, int]:
    """Messages not yet delivered, by status: pending (waiting, being sent or to be retried) and failed."""
    counts = dict(
        OutboxMessage.objects.order_by().filter(status__in=UNDELIVERED).values_list("status").annotate(n=Count("pk"))
    )
    return {status.value: counts.get(status, 0) for status in UNDELIVERED}


def oldest_pending_age() -> float:
    """Seconds since the oldest pending message was written (0 when none waits)."""
    oldest = OutboxMessage.objects.filter(status=OutboxMessage.Status.PENDING).aggregate(oldest=Min("created_at"))
    if oldest["oldest"] is None:
        return 0.0
    return max(0.0, (timezone.now() - oldest["oldest"]).total_seconds())


def collect() -> Iterator[Metric]:
    """The LIS outbox metric families (used by ``wbcsite.metrics``)."""
    messages = GaugeMetricFamily(
        "wbc_lis_outbox_messages",
        "LIS result messages not yet delivered, by status (pending: waiting or retrying; failed: refused, needs a "
        "person).",
        labels=["status"],
    )
    for status, count in backlog().items():
        messages.add_metric([status], count)
    yield messages
    yield GaugeMetricFamily(
        "wbc_lis_outbox_oldest_pending_age_seconds",
        "Seconds since the oldest pending LIS message was written (0: none pending).",
        value=oldest_pending_age(),
    )
