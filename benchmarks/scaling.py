"""Scaling out: one large batch classified by 1 worker versus 2 workers, on PostgreSQL.

    python benchmarks/scaling.py [--model mobilenet_v2_finetuned] [--images 1000] [--data ../shared/data/pbc]
                                 [--database-url postgres://postgres@127.0.0.1:5432/postgres] [--rounds 2]

A fresh database (created on the given server, dropped at the end), a fresh media folder, the bundled model
registered with its ONNX copy. Each worker is a real ``manage.py run_worker`` with ``WBC_ONNX_THREADS=1`` and,
where the machine has the cores, pinned to a core of its own (so "1 worker" means one core's worth of work,
decoding included, and "2 workers" two). The batch (N real PBC JPEGs, or generated 360x363 JPEG smears without
the data folder) is stored with ``reports.submission.submit_batch`` and timed from its commit until it is done;
its chunks (``WBC_CHUNK_SIZE``) are what the workers share. Rounds alternate 1 and 2 workers; medians are
reported, with images/s, the ratio (goal >= 1.8x), and how many cores' worth of CPU time the workers actually got
while timed (on a shared machine, less than the number of workers means they waited for a core). Every image must
have exactly one prediction. Images/s per core used shows the cost of sharing a batch: equal for 1 and 2 workers
means nothing in the chunk design serialises them, so with a free core each the ratio approaches 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def create_database(server_url: str) -> str:
    """A new, empty database on ``server_url``'s server; returns its URL."""
    import psycopg

    name = f"wbc_scaling_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(server_url: str, url: str) -> None:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def setup_platform(model_name: str):
    """Migrate, register the bundled models (with their ONNX copies) and make a technologist; (user, model)."""
    import django
    from django.core.management import call_command

    django.setup()
    from django.contrib.auth.models import Group

    from accounts.models import Laboratory, User
    from classifier.models import ClassifierModel

    call_command("migrate", verbosity=0)
    call_command("register_models", verbosity=0)
    lab = Laboratory.objects.create(name="Bench")
    user = User.objects.create_user("bench", password="bench-password-123", laboratory=lab)
    user.groups.add(Group.objects.get(name="Technologist"))
    return user, ClassifierModel.objects.get(architecture=model_name)


def start_workers(count: int, env: dict[str, str]) -> list[subprocess.Popen]:
    """``count`` workers, each on a core of its own (``taskset``) when there are enough cores."""
    cores = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    workers = []
    for index in range(count):
        pin = ["taskset", "-c", str(cores[index])] if taskset and len(cores) >= count else []
        command = [*pin, sys.executable, "manage.py", "run_worker"]
        workers.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    return workers


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.wait(timeout=60)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by these processes (all their threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def wait_done(batch_id: int, timeout: float = 1800) -> None:
    from reports.models import Batch

    deadline = time.monotonic() + timeout
    while not Batch.objects.get(pk=batch_id).is_finished:
        if time.monotonic() > deadline:
            raise RuntimeError(f"batch {batch_id} not finished after {timeout:.0f} s")
        time.sleep(0.05)


def time_batch(user, record, entries) -> tuple[float, int]:
    """(seconds from the batch's commit until it is done, how many workers took its chunks); checks every image has
    exactly one prediction."""
    from reports.models import Batch, BatchItem
    from reports.submission import submit_batch

    batch = submit_batch(user, entries, record, name="scaling")
    started = time.perf_counter()
    wait_done(batch.pk)
    elapsed = time.perf_counter() - started
    batch = Batch.objects.get(pk=batch.pk)
    classified = batch.items.filter(status=BatchItem.Status.DONE, prediction__isnull=False).count()
    if batch.status != Batch.Status.DONE or classified != len(entries):
        raise RuntimeError(f"batch {batch.pk}: {batch.status}, {classified} of {len(entries)} classified")
    return elapsed, batch.chunks.values("worker_id").distinct().count()


def warm_up(user, record, entries, workers: list[subprocess.Popen]) -> None:
    """Small batches until every worker has classified a chunk (model loaded, ONNX session made)."""
    from reports.models import BatchChunk, WorkerHeartbeat

    pids = {worker.pid for worker in workers}
    for _ in range(20):
        time_batch(user, record, entries)
        ids = set(BatchChunk.objects.filter(status="done").values_list("worker_id", flat=True))
        warm = set(WorkerHeartbeat.objects.filter(worker_id__in=ids).values_list("pid", flat=True))
        if pids <= warm:
            return
    raise RuntimeError("not every worker took a chunk during the warm-up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2_finetuned")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "pbc")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from batch_throughput import load_images

    workdir = Path(tempfile.mkdtemp(prefix="wbc-scaling-"))
    url = create_database(args.database_url)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "wbcsite.settings",
        "DATABASE_URL": url,
        "MEDIA_ROOT": str(workdir / "media"),
        "WBC_ONNX_DIR": str(workdir / "onnx"),
        "WBC_ONNX_THREADS": "1",
        "WBC_BATCH_MAX_FILES": str(max(1000, args.images)),
        "SECRET_KEY": "benchmark-only-" + "x" * 50,
        "LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    timings: dict[int, list[float]] = {1: [], 2: []}
    sharing: dict[int, list[int]] = {1: [], 2: []}
    busy: dict[int, list[float]] = {1: [], 2: []}  # cores' worth of CPU the workers got while timed
    try:
        from reports.uploads import NamedBytes

        user, record = setup_platform(args.model)
        images = load_images(args.data, args.images)
        entries = [NamedBytes(name, data) for name, data in images]
        warm_entries = entries[:64]
        for _ in range(args.rounds):
            for count in (1, 2):
                workers = start_workers(count, env)
                try:
                    warm_up(user, record, warm_entries, workers)
                    pids = [worker.pid for worker in workers]
                    cpu_before = cpu_seconds(pids)
                    seconds, took = time_batch(user, record, entries)
                    timings[count].append(seconds)
                    sharing[count].append(took)
                    busy[count].append((cpu_seconds(pids) - cpu_before) / seconds)
                finally:
                    stop_workers(workers)
    finally:
        from django.db import connections

        connections.close_all()
        drop_database(args.database_url, url)
        shutil.rmtree(workdir, ignore_errors=True)
    from django.conf import settings

    source = "real PBC test-split JPEGs" if args.data.is_dir() else "generated 360x363 JPEGs"
    pinned = len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset")
    load = os.getloadavg()
    print(f"\n{len(entries)} {source}, model {args.model}, PostgreSQL, chunks of {settings.WBC_CHUNK_SIZE}, ")
    print(f"1 ONNX Runtime thread per worker{', each worker pinned to its own core' if pinned else ''}; ")
    print(f"{os.cpu_count()} CPU cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end; ")
    print(f"median of {args.rounds} rounds\n")
    print(
        f"{'workers':<10}{'seconds':>10}{'images/s':>10}{'vs 1 worker':>14}{'cores used':>12}{'img/s per core':>16}"
        "   rounds (s; workers that took chunks)"
    )
    base = len(entries) / statistics.median(timings[1])
    for count, values in timings.items():
        rate = len(entries) / statistics.median(values)
        rounds = ", ".join(f"{v:.1f} ({n})" for v, n in zip(values, sharing[count], strict=True))
        seconds, cores = statistics.median(values), statistics.median(busy[count])
        per_core = rate / cores if cores else float("nan")
        print(f"{count:<10}{seconds:>10.1f}{rate:>10.1f}{rate / base:>13.2f}x{cores:>12.2f}{per_core:>16.1f}  {rounds}")
    print(f"\nscaling 1 -> 2 workers: {len(entries) / statistics.median(timings[2]) / base:.2f}x (goal >= 1.8x)")


if __name__ == "__main__":
    main()
