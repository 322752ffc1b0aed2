"""Media uploads to S3 as the app makes them, against the settings before them, in one process.

    python benchmarks/s3_upload.py [--uploads 200] [--threads 4]

Starts moto in server mode on loopback (``tests/s3.py``), makes two django-storages ``S3Storage`` objects from
``wbcsite.settings`` on one fresh bucket: the app's media storage (``file_overwrite`` on, ``use_threads`` off: one
PutObject per upload) and the baseline before it (``file_overwrite`` off, ``use_threads`` on: a HEAD to look for a free
name, then the upload through a transfer thread pool). ``--threads`` threads upload small JPEGs of real size (about
20 kB) through each in turn, interleaved in rounds, the way a batch submission writes through the file pool. Prints
per-upload p50/p95, uploads per second and the ratio against the baseline, and the S3 calls each made.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wbcsite.settings")

ROUNDS = 4


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(120, 120, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def storages(env: dict[str, str]):
    os.environ.update(env)
    import django

    django.setup()
    from storages.backends.s3 import S3Storage

    from wbcsite.settings import storages_config

    app_options = storages_config()["default"]["OPTIONS"]
    baseline_options = {**app_options, "file_overwrite": False, "use_threads": True}
    return {
        "before (HEAD + threaded upload)": S3Storage(**baseline_options),
        "now (one PutObject)": S3Storage(**app_options),
    }


CALLS: dict[str, dict[str, int]] = {}  # storage name -> S3 operation -> calls (reset before each run)


def upload_all(name: str, storage, data: list[bytes], threads: int) -> tuple[list[float], float, dict[str, int]]:
    from django.core.files.base import ContentFile

    CALLS[name] = {}

    def count(model, **_):
        CALLS[name][model.name] = CALLS[name].get(model.name, 0) + 1

    def one(payload: bytes) -> float:
        # django-storages keeps a client per thread: count on this thread's (registered once per client)
        storage.connection.meta.client.meta.events.register("before-call.s3", count, unique_id=f"count-{name}")
        started = time.perf_counter()
        storage.save(f"batches/bench/{uuid.uuid4()}-0.jpg", ContentFile(payload))
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        times = list(pool.map(one, data))
    return times, time.perf_counter() - started, dict(CALLS[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=200, help="uploads per storage and round")
    parser.add_argument("--threads", type=int, default=4, help="uploading threads (the file pool has 4)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from s3 import REGION, running_s3_server, s3_env

    data = [jpeg(seed) for seed in range(args.uploads)]
    with tempfile.TemporaryDirectory() as folder, running_s3_server(Path(folder)) as server:
        bucket = server.new_bucket()
        targets = storages({**s3_env(server.endpoint, bucket), "AWS_S3_REGION_NAME": REGION})
        for name, storage in targets.items():
            upload_all(name, storage, data[:10], args.threads)  # warm-up: clients, connections (not counted)
        results = {name: ([], 0.0, {}) for name in targets}
        for _ in range(ROUNDS):  # interleaved, so both see the same machine
            for name, storage in targets.items():
                times, wall, calls = upload_all(name, storage, data, args.threads)
                kept = results[name]
                results[name] = (kept[0] + times, kept[1] + wall, calls)  # calls: the last round's
    baseline = len(results[next(iter(results))][0]) / results[next(iter(results))][1]
    print(f"{args.uploads} uploads x {ROUNDS} rounds per storage, {args.threads} threads, ~{len(data[0]) // 1000} kB")
    print(f"{'storage':34} {'p50 ms':>8} {'p95 ms':>8} {'uploads/s':>10} {'ratio':>6}  S3 calls per upload")
    for name, (times, wall, calls) in results.items():
        rate = len(times) / wall
        per_upload = ", ".join(f"{op} {count / args.uploads:g}" for op, count in sorted(calls.items()))
        p95 = statistics.quantiles(times, n=20)[-1] * 1000
        print(
            f"{name:34} {statistics.median(times) * 1000:>8.1f} {p95:>8.1f} {rate:>10.1f} "
            f"{rate / baseline:>6.2f}  {per_upload}"
        )


if __name__ == "__main__":
    main()
