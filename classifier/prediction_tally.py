"""Every prediction counted per model with its latency histogram, cheaply enough for each Prometheus scrape.

Why from the database: images are classified by the background workers (batches) on any number of hosts and by
every gunicorn process (single images), while a scrape reaches one web process. Per-process counters would need a
scrape target per worker process and host (and ``PROMETHEUS_MULTIPROC_DIR`` files per host) and would start from
zero on every restart; the ``Prediction`` table already holds every classified image with its model and
``processing_ms``, shared by all hosts. Its counts per model and per bucket are true cumulative histogram buckets,
so Prometheus' ``rate()`` and ``histogram_quantile()`` work on them as on any histogram.

Why not one aggregate over the whole table per scrape: that is a full scan, 0.7–1.1 s per million predictions on
PostgreSQL (``benchmarks/metrics_scrape.py`` on a shared 2-core machine), and the table only grows. Predictions are
never changed once written, so the tally of the *settled* rows (ids up to that of the newest row written more than
``SETTLE`` ago, whose transactions have long committed) is kept in the process, and each scrape adds only the rows
above it: a primary-key range, a few rows. The settled tally moves up at each scrape and is recomputed from scratch
every ``REFRESH`` (it would otherwise keep rows deleted since, e.g. a laboratory removed). Every process reaches the
same totals whatever its tally's boundary, so scrapes answered by different processes or hosts agree.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from django.db.models import Count, Q, QuerySet, Sum
from django.utils import timezone

from .models import Prediction

# Upper bounds (seconds) of the per-image latency buckets: ~1 ms (a small CNN in a batch) up to 10 s (a cold model).
LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SETTLE = timedelta(minutes=10)  # far longer than any transaction that writes predictions
REFRESH_SECONDS = 3600.0


@dataclass(frozen=True)
class ModelLatency:
    """Predictions of one model: how many, their summed latency, and cumulative counts per bucket bound."""

    count: int
    sum_seconds: float
    cumulative: tuple[int, ...]  # one count per LATENCY_BUCKETS_SECONDS bound (processing time <= bound)

    def __add__(self, other: ModelLatency) -> ModelLatency:
        pairs = zip(self.cumulative, other.cumulative, strict=True)
        return ModelLatency(
            self.count + other.count, self.sum_seconds + other.sum_seconds, tuple(a + b for a, b in pairs)
        )


def aggregate(predictions: QuerySet[Prediction]) -> dict[int, ModelLatency]:
    """One aggregate query: count, latency sum and a filtered count per bucket bound, grouped by model id."""
    buckets = {
        f"le{index}": Count("model_id", filter=Q(processing_ms__lte=bound * 1000.0))
        for index, bound in enumerate(LATENCY_BUCKETS_SECONDS)
    }
    rows = predictions.order_by().values("model_id").annotate(n=Count("model_id"), ms=Sum("processing_ms"), **buckets)
    return {
        row["model_id"]: ModelLatency(
            count=row["n"],
            sum_seconds=(row["ms"] or 0.0) / 1000.0,
            cumulative=tuple(row[f"le{index}"] for index in range(len(LATENCY_BUCKETS_SECONDS))),
        )
        for row in rows
    }


def merge(*tallies: dict[int, ModelLatency]) -> dict[int, ModelLatency]:
    """Per-model sums of several tallies (a handful of models, not rows)."""
    merged: dict[int, ModelLatency] = {}
    for tally in tallies:
        for model_id, entry in tally.items():
            merged[model_id] = merged[model_id] + entry if model_id in merged else entry
    return merged


def settled_id() -> int:
    """The id of the newest prediction written more than SETTLE ago (0: none): rows up to it no longer change."""
    cutoff = timezone.now() - SETTLE
    newest = Prediction.objects.filter(created_at__lt=cutoff).order_by("-created_at").values_list("pk")[:1]
    return newest[0][0] if newest else 0


@dataclass(frozen=True)
class _Settled:
    upto_id: int  # every prediction with an id up to this one is in ``by_model``
    made_at: float  # time.monotonic() of the full recount
    by_model: dict[int, ModelLatency]


class PredictionTally:
    """The per-process tally of settled predictions; thread-safe (gunicorn's gthread workers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settled: _Settled | None = None

    def forget(self) -> None:
        with self._lock:
            self._settled = None

    def _advance(self) -> _Settled:
        upto, now, settled = settled_id(), time.monotonic(), self._settled
        if settled is None or upto < settled.upto_id or now - settled.made_at > REFRESH_SECONDS:
            return _Settled(upto, now, aggregate(Prediction.objects.filter(pk__lte=upto)))
        if upto == settled.upto_id:
            return settled
        newly = aggregate(Prediction.objects.filter(pk__gt=settled.upto_id, pk__lte=upto))
        return _Settled(upto, settled.made_at, merge(settled.by_model, newly))

    def by_model(self) -> dict[int, ModelLatency]:
        """Every prediction so far, per model id: the settled tally plus the rows written since."""
        with self._lock:
            self._settled = self._advance()
            settled = self._settled
        return merge(settled.by_model, aggregate(Prediction.objects.filter(pk__gt=settled.upto_id)))


TALLY = PredictionTally()
