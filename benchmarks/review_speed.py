"""Review station speed: the review page and its state (a 200-cell slide) and saving one reclassification.

    python benchmarks/review_speed.py [--cells 200] [--rounds 30]

Makes a throw-away SQLite database (migrated from empty) and media folder, one lab, one technologist and a
finished slide of N classified cells (a quarter flagged, each with a thumbnail name), then times requests through
Django's test client, in this process, in alternating rounds: the baseline (the plain batch list, 1 slide), the
review page HTML, the review state JSON (every cell, the differential, counts) and a reclassification save (one
cell, one class, one transaction, one audit row, the new differential). Prints the median and 90th percentile of
the server time, the SQL queries per request and the ratio of each median to the baseline's. Targets (issue 14):
review page ≤ 300 ms, saving a reclassification ≤ 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORK = Path(tempfile.mkdtemp(prefix="wbc-review-bench-"))
os.environ.update(
    {
        "DJANGO_SETTINGS_MODULE": "wbcsite.settings",
        "DATABASE_URL": f"sqlite:///{WORK / 'bench.sqlite3'}",
        "MEDIA_ROOT": str(WORK / "media"),
        "ALLOWED_HOSTS": "testserver",
        "DEBUG": "0",
    }
)

import django  # noqa: E402

django.setup()

from django.contrib.auth.models import Group  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from django.urls import reverse  # noqa: E402

from wbc_ml.datasets import WBC_CLASSES  # noqa: E402

TARGETS_MS = {"review page (HTML)": 300.0, "review state (JSON)": 300.0, "save a reclassification": 50.0}


def make_slide(n_cells: int):
    from accounts.models import Laboratory, User
    from classifier.models import ClassifierModel, Prediction
    from reports.models import Batch, BatchItem

    lab = Laboratory.objects.create(name="Bench lab")
    user = User.objects.create_user("bench", password="bench-password-long", laboratory=lab)
    user.groups.add(Group.objects.get(name="Technologist"))
    record = ClassifierModel.objects.create(
        name="Bench model",
        architecture="none",
        file_name="none.keras",
        sha256="0" * 64,
        input_height=96,
        input_width=96,
        normalization={"method": "scale01"},
        class_names=list(WBC_CLASSES),
    )
    batch = Batch.objects.create(laboratory=lab, user=user, name="Bench slide", model=record, status="done")
    predictions = Prediction.objects.bulk_create(
        [
            Prediction(
                laboratory=lab,
                user=user,
                model=record,
                model_version="1",
                image=f"cells/{i}.png",
                original_filename=f"cell-{i:03d}.png",
                width=96,
                height=96,
                predicted_class=WBC_CLASSES[i % 5],
                confidence=0.6 if i % 4 == 0 else 0.97,
                probabilities=[0.1, 0.1, 0.1, 0.1, 0.6],
                is_outlier=i % 8 == 0,
                processing_ms=5.0,
            )
            for i in range(n_cells)
        ]
    )
    BatchItem.objects.bulk_create(
        [
            BatchItem(
                batch=batch,
                position=i,
                original_filename=p.original_filename,
                image=f"batches/{i}.png",
                thumbnail=f"thumbnails/{i}.webp",
                status="done",
                prediction=p,
            )
            for i, p in enumerate(predictions)
        ]
    )
    return user, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    call_command("migrate", verbosity=0)
    user, batch = make_slide(args.cells)
    client = Client()
    client.force_login(user)
    cell = batch.items.order_by("position").first().pk
    classify_url = reverse("reports:review_classify", args=[batch.uid])
    flip = {"n": 0}  # the class alternates, so every save really changes the cell (and writes an audit row)

    def save_reclassification():
        flip["n"] += 1
        body = json.dumps({"cells": [cell], "class": WBC_CLASSES[flip["n"] % 2]})
        return client.post(classify_url, body, content_type="application/json")

    paths = {
        "baseline: batch list": lambda: client.get(reverse("reports:batches")),
        "review page (HTML)": lambda: client.get(reverse("reports:review", args=[batch.uid])),
        "review state (JSON)": lambda: client.get(reverse("reports:review_state", args=[batch.uid])),
        "save a reclassification": save_reclassification,
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    queries: dict[str, int] = {}
    for name, call in paths.items():  # warm-up, and the query count of each
        with CaptureQueriesContext(connection) as captured:
            response = call()
        assert response.status_code == 200, (name, response.status_code)
        queries[name] = len(captured)
    for _ in range(args.rounds):
        for name, call in paths.items():
            start = time.perf_counter()
            response = call()
            times[name].append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, (name, response.status_code)

    baseline = statistics.median(times["baseline: batch list"])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Review speed: {args.cells} cells, {args.rounds} rounds, SQLite, Django test client (server time)")
    print(f"{os.cpu_count()} CPUs, load average {load} (a busy machine slows every row alike: read the ratios)\n")
    print(f"{'request':<26}{'median ms':>10}{'p90 ms':>9}{'queries':>9}{'× baseline':>12}{'target ms':>11}")
    for name, values in times.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        target = TARGETS_MS.get(name)
        shown_target = f"{target:.0f}" if target else "—"
        ratio = median / baseline
        print(f"{name:<26}{median:>10.1f}{p90:>9.1f}{queries[name]:>9}{ratio:>12.2f}{shown_target:>11}")


if __name__ == "__main__":
    main()
