"""Classification numbers for ``/metrics``: images classified per model, their latency, and images per second.

The counter and the histogram come from ``classifier.prediction_tally`` (the database's predictions, counted
incrementally; its docstring says why that and not per-process counters). A lab's own uploaded model is labelled
``lab-model-<id>``, never by its name: the name is the lab's choice and may name the lab. Shared (bundled) models
keep their names.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from django.db.models import Count
from django.utils import timezone
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from .models import ClassifierModel, Prediction
from .prediction_tally import LATENCY_BUCKETS_SECONDS, TALLY

RECENT_SECONDS = 60  # the window of the images-per-second gauge


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
    latencies = TALLY.by_model()
    recent = recent_counts()
    labels = model_labels(set(latencies) | set(recent))

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
    for model_id, entry in sorted(latencies.items()):
        name = labels.get(model_id, f"model-{model_id}")
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
