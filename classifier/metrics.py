"""Classification numbers for ``/metrics``: images classified per model and their latency, read from the database.

Why from the database and not from counters in the process that classifies: images are classified by the
background workers (batches) on any number of hosts and by every gunicorn process (single images), while a scrape
reaches one web process. Per-process counters would need a scrape target per worker process and host (and
``PROMETHEUS_MULTIPROC_DIR`` files per host); the ``Prediction`` table already holds every classified image with
its model and ``processing_ms``, is shared by all hosts, and survives restarts. So the counter and the histogram
are computed at scrape time by ONE aggregate query (``GROUP BY model_id`` with a filtered ``COUNT`` per bucket),
which gives true cumulative buckets: Prometheus' ``rate()`` and ``histogram_quantile()`` work on them as on any
histogram. The composite index ``classifier_prediction_model_ms`` (model, processing_ms) covers the query, so
PostgreSQL reads the narrow index instead of the wide rows (see docs/deploy.md for measured costs). If predictions
are deleted (a laboratory removed), the numbers go down once, which Prometheus treats as a counter reset.

A lab's own uploaded model is labelled ``lab-model-<id>``, never by its name: the name is the lab's choice and may
name the lab. Bundled (shared) models keep their names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from django.db.models import Count, Q, Sum
from django.utils import timezone
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from .models import ClassifierModel, Prediction

# Upper bounds (seconds) of the per-image latency buckets: ~1 ms (a small CNN in a batch) up to 10 s (a cold model).
LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RECENT_SECONDS = 60  # the window of the images-per-second gauge


@dataclass(frozen=True)
class ModelLatency:
    """All predictions of one model: how many, their summed latency, and cumulative counts per bucket bound."""

    model_id: int
    count: int
    sum_seconds: float
    cumulative: tuple[int, ...]  # one count per LATENCY_BUCKETS_SECONDS bound (processing time <= bound)


def latency_by_model() -> list[ModelLatency]:
    """One aggregate query over every prediction: count, latency sum and bucket counts, grouped by model."""
    buckets = {
        f"le{index}": Count("model_id", filter=Q(processing_ms__lte=bound * 1000.0))
        for index, bound in enumerate(LATENCY_BUCKETS_SECONDS)
    }
    rows = (
        Prediction.objects.order_by()
        .values("model_id")
        .annotate(n=Count("model_id"), total_ms=Sum("processing_ms"), **buckets)
    )
    return [
        ModelLatency(
            model_id=row["model_id"],
            count=row["n"],
            sum_seconds=(row["total_ms"] or 0.0) / 1000.0,
            cumulative=tuple(row[f"le{index}"] for index in range(len(LATENCY_BUCKETS_SECONDS))),
        )
        for row in rows
    ]


def recent_counts(seconds: int = RECENT_SECONDS) -> dict[int, int]:
    """Predictions made in the last ``seconds`` per model id (a range on the indexed ``created_at``)."""
    since = timezone.now() - timedelta(seconds=seconds)
    rows = Prediction.objects.order_by().filter(created_at__gte=since).values("model_id").annotate(n=Count("pk"))
    return {row["model_id"]: row["n"] for row in rows}


def model_labels(model_ids: set[int]) -> dict[int, str]:
    """The ``model`` label of each id: "<name> v<version>" for a shared model, "lab-model-<id>" for a lab's own."""
    rows = ClassifierModel.objects.filter(pk__in=model_ids).values_list("pk", "name", "version", "laboratory_id")
    return {pk: f"lab-model-{pk}" if lab else f"{name} v{version}" for pk, name, version, lab in rows}


def collect() -> Iterator[Metric]:
    """The classification metric families (used by ``wbcsite.metrics``)."""
    latencies = latency_by_model()
    recent = recent_counts()
    labels = model_labels({entry.model_id for entry in latencies} | set(recent))

    total = CounterMetricFamily(
        "wbc_predictions",
        "Images classified (single images and batch items), by model, over all hosts; rate() gives images/s.",
        labels=["model"],
    )
    latency = HistogramMetricFamily(
        "wbc_classification_latency_seconds",
        "Classification time per image (Prediction.processing_ms; a batch chunk's time shared by its images), "
        "by model.",
        labels=["model"],
    )
    for entry in latencies:
        name = labels.get(entry.model_id, f"model-{entry.model_id}")
        total.add_metric([name], entry.count)
        buckets = [
            (floatToGoString(bound), n) for bound, n in zip(LATENCY_BUCKETS_SECONDS, entry.cumulative, strict=True)
        ]
        latency.add_metric([name], buckets=[*buckets, ("+Inf", entry.count)], sum_value=entry.sum_seconds)
    per_second = GaugeMetricFamily(
        "wbc_images_per_second_last_minute",
        f"Images classified per second over the last {RECENT_SECONDS} s, by model "
        "(for graphs prefer rate(wbc_predictions_total)).",
        labels=["model"],
    )
    for model_id, count in sorted(recent.items()):
        per_second.add_metric([labels.get(model_id, f"model-{model_id}")], count / RECENT_SECONDS)
    yield from (total, latency, per_second)
