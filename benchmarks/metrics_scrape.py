"""What a Prometheus scrape of /metrics costs on a database with many predictions.

    DATABASE_URL=postgres://…/wbc python benchmarks/metrics_scrape.py [--rounds 10]

Reads (never writes) the database in DATABASE_URL. Times, in this process: a round trip (``SELECT 1``, the
baseline), a full count of every prediction per model and latency bucket (what each scrape would cost without the
tally, and what the first scrape of a web process and the hourly recount cost), and a steady scrape (the whole
/metrics body: the tally plus the predictions above it, the queue, heartbeats and LIS outbox). Prints medians and
each one's ratio to the baseline. To measure on a large table, fill a scratch database first, e.g. one million rows:

    INSERT INTO classifier_prediction (uid, laboratory_id, user_id, model_id, model_version, model_sha256,
        normalization, image, original_filename, width, height, predicted_class, confidence, probabilities,
        ood_score, is_outlier, processing_ms, gradcam, gradient, created_at)
    SELECT gen_random_uuid(), 1, 1, 1 + g % 3, '1', repeat('a', 64), '{}', 'c.png', 'c.png', 360, 363,
        'neutrophil', 0.9, '[0.9, 0.025, 0.025, 0.025, 0.025]', 1.5, false, random() * 50, '', '',
        now() - (1000001 - g) * interval '1 second'
    FROM generate_series(1, 1000000) g;
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wbcsite.settings")


def median_seconds(action: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    import django

    django.setup()
    from django.db import connection
    from prometheus_client import generate_latest

    from classifier.models import Prediction
    from classifier.prediction_tally import TALLY, aggregate
    from wbcsite.metrics import REGISTRY

    def round_trip() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()

    round_trip()
    baseline = median_seconds(round_trip, args.rounds)
    full = median_seconds(lambda: aggregate(Prediction.objects.all()), max(3, args.rounds // 3))
    TALLY.forget()
    generate_latest(REGISTRY)  # the first scrape of a process: counts the settled predictions once
    steady = median_seconds(lambda: generate_latest(REGISTRY), args.rounds)

    print(f"{connection.vendor}, {Prediction.objects.count():,} predictions, median of {args.rounds} rounds")
    print(f"{'step':<46} {'median ms':>10} {'× baseline':>11}")
    for name, seconds in (
        ("baseline: SELECT 1 round trip", baseline),
        ("full count of every prediction (first scrape)", full),
        ("steady scrape: the whole /metrics body", steady),
    ):
        print(f"{name:<46} {seconds * 1000:>10.1f} {seconds / baseline:>11.1f}")


if __name__ == "__main__":
    main()
