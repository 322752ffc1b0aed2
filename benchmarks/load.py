"""Load test: many LIS clients at once against a multi-process stack this script starts on loopback.

    python benchmarks/load.py [--users 20] [--images 100] [--model enhanced_cnn_v2] [--synthetic]
                              [--web 2] [--workers 2] [--postgres postgres://postgres@127.0.0.1:5432/postgres]
                              [--storage s3|local] [--redis redis://127.0.0.1:6379/0]

The stack (benchmarks/load_stack.py): a throw-away PostgreSQL database on the machine's server (created and
dropped here), S3 from moto in server mode, gunicorn over HTTPS (a self-signed certificate made here) with --web
gthread processes, and --workers background workers (each limited to --onnx-threads ONNX Runtime threads where the
WBC_ONNX_THREADS setting exists, and at the niceness WBC_WORKER_NICE gives them, 10 unless the environment says
otherwise: web requests get the CPU first, as in a deployment). The bundled models are registered; a laboratory,
one user and one API token per simulated user are made with the project's own models. The API rates are raised
through WBC_API_RATE and WBC_API_SUBMIT_RATE (--api-rate); a 429 is counted all the same.

Then --users clients each submit one batch of --images images through POST /api/v1/batches/ and poll it until it
is finished, while a single-image client times POST /api/v1/predictions/ alongside. Images are real PBC JPEGs from
$WBC_DATA_DIR/pbc (every user its own), or generated 360x363 JPEG smears with --synthetic.

Printed: throughput, submit and poll p50/p95, single-image latency idle and under load, 5xx/429/transport error
counts, the peak RSS (VmHWM) of every web process and worker, and baselines measured in this same run: single-image
latency under load vs idle, and end-to-end throughput vs raw ONNX Runtime (decode + classify in this process, on
the same images, on an idle stack). A database check that every submitted image has exactly one prediction prints
PASS or FAIL (the exit status is 1 on FAIL). Goals beside the numbers: 0 errors, submit p95 <= 1 s, web RSS <= 350
MB per process. Every request has a timeout and every loop a deadline; every child process is killed on the way
out, also on Ctrl+C.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from load_stack import REPO, Stack, peak_rss_mb, running_stack, signals_unwind  # noqa: E402

REQUEST_TIMEOUT = (10, 180)  # (connect, read) seconds of every HTTP request
MAX_ATTEMPTS = 8  # of one submission (same Idempotency-Key) after a 429, a 5xx or a dropped connection
GOAL_SUBMIT_P95_S = 1.0
GOAL_WEB_RSS_MB = 350.0


# --- images -----------------------------------------------------------------------------------------------------


def synthetic_images(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Generated 360x363 JPEG smears (pink background, one purple nucleus), different pixels for each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:363, 0:360]
    images = []
    for i in range(n):
        pixels = rng.normal((225, 190, 200), 12, size=(363, 360, 3))
        cy, cx, radius = rng.integers(140, 220), rng.integers(140, 220), rng.integers(50, 90)
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = (120, 60, 150)
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        images.append((f"synthetic_{i:05d}.jpg", buffer.getvalue()))
    return images


def pbc_images(data: Path, n: int) -> list[tuple[str, bytes]]:
    """n real PBC JPEGs spread over every class (repeated only when the folder has fewer than n)."""
    paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        raise SystemExit(f"No images under {data}: give --data, or run with --synthetic.")
    step = max(1, len(paths) // n)
    chosen = [paths[(i * step) % len(paths)] for i in range(n)]
    return [(f"{p.parent.name}_{p.name}", p.read_bytes()) for p in chosen]


# --- measurements -----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Latencies and status codes, shared by every client thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)
    transport_errors: Counter = field(default_factory=Counter)

    def record(self, kind: str, seconds: float, status: int) -> None:
        with self.lock:
            self.statuses[status] += 1
            if status < 400:
                self.latencies.setdefault(kind, []).append(seconds)

    def transport_error(self, kind: str, exc: Exception) -> None:
        with self.lock:
            self.transport_errors[f"{kind}: {type(exc).__name__}"] += 1

    def count(self, predicate) -> int:
        return sum(n for status, n in self.statuses.items() if predicate(status))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class PeakRss:
    """Polls VmHWM of the web processes and workers every second, keeping each pid's peak (a web process that
    gunicorn replaced keeps its last figure)."""

    def __init__(self, stack: Stack) -> None:
        self.stack, self.web, self.workers = stack, {}, {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def sample(self) -> None:
        for kind, pids in (("web", self.stack.web_pids()), ("workers", [w.pid for w in self.stack.workers])):
            table = getattr(self, kind)
            for pid in pids:
                mb = peak_rss_mb(pid)
                if mb is not None:
                    table[pid] = max(mb, table.get(pid, 0.0))

    def _run(self) -> None:
        while not self.stopped.wait(1.0):
            self.sample()

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sample()


# --- the clients ------------------------------------------------------------------------------------------------


class Client:
    """One API client (a requests session with its own token), counting every answer in the shared tally."""

    def __init__(self, stack: Stack, token: str, tally: Tally, abort: threading.Event | None = None) -> None:
        import requests

        self.base, self.tally = f"{stack.base_url}/api/v1", tally
        self.abort = abort or threading.Event()  # set on Ctrl+C or a failure: every loop below ends at once
        self.session = requests.Session()
        self.cert = str(stack.cert)  # TLS checked against the stack's own self-signed certificate
        self.session.headers["Authorization"] = f"Token {token}"

    def request(self, kind: str, method: str, url: str, **kwargs):
        """One timed request; None after a dropped connection or a timeout (counted)."""
        import requests

        started = time.perf_counter()
        try:
            # verify per request: a session's own would lose to REQUESTS_CA_BUNDLE (requests issue 3829)
            response = self.session.request(method, url, timeout=REQUEST_TIMEOUT, verify=self.cert, **kwargs)
        except requests.RequestException as exc:
            self.tally.transport_error(kind, exc)
            return None
        self.tally.record(kind, time.perf_counter() - started, response.status_code)
        return response

    def classify(self, image: tuple[str, bytes], model_id: int) -> dict | None:
        name, data = image
        response = self.request(
            "single", "POST", f"{self.base}/predictions/", files={"file": (name, data)}, data={"model": model_id}
        )
        return response.json() if response is not None and response.status_code == 201 else None

    def submit(self, images: list[tuple[str, bytes]], model_id: int, deadline: float) -> str | None:
        """Submit one batch, retrying the same Idempotency-Key after a 429, a 5xx or a dropped connection; the
        batch's API URL, or None."""
        key = str(uuid.uuid4())
        files = [("files", (name, data, "image/jpeg")) for name, data in images]
        for _attempt in range(MAX_ATTEMPTS):
            if self.abort.is_set():
                return None
            response = self.request(
                "submit",
                "POST",
                f"{self.base}/batches/",
                files=files,
                data={"model": model_id, "external_id": f"LOAD-{key[:8]}"},
                headers={"Idempotency-Key": key},
            )
            if response is not None and response.status_code in (200, 202):
                return response.json()["url"]
            if response is not None and response.status_code < 500 and response.status_code != 429:
                raise RuntimeError(f"batch refused ({response.status_code}): {response.text[:500]}")
            wait = float(response.headers.get("Retry-After", 1)) if response is not None else 1.0
            if time.monotonic() + wait > deadline:
                return None
            self.abort.wait(min(wait, 30))
        return None

    def wait_done(self, url: str, deadline: float, interval: float) -> dict | None:
        """Poll the batch until it is done or failed (its last answer), or None at the deadline."""
        while time.monotonic() < deadline and not self.abort.is_set():
            response = self.request("poll", "GET", url)
            if response is not None and response.status_code == 200:
                body = response.json()
                if body["status"] in ("done", "failed"):
                    return body
            self.abort.wait(interval)
        return None


@dataclass
class UserRun:
    url: str | None = None
    body: dict | None = None
    finished_at: float | None = None
    error: str = ""


def run_user(client: Client, images, model_id: int, deadline: float, interval: float, start: threading.Event):
    run = UserRun()
    start.wait(timeout=60)
    try:
        run.url = client.submit(images, model_id, deadline)
        if run.url:
            run.body = client.wait_done(run.url, deadline, interval)
            run.finished_at = time.perf_counter()
    except Exception as exc:  # reported in the table, never hidden
        run.error = f"{type(exc).__name__}: {exc}"
    return run


def singles_until(client: Client, images, model_id: int, stop: threading.Event, pause: float) -> int:
    """Single-image requests, one after another with a short pause, until ``stop``; how many succeeded."""
    succeeded = 0
    for i in range(1_000_000):
        if stop.is_set() or client.abort.is_set():
            break
        succeeded += client.classify(images[i % len(images)], model_id) is not None
        stop.wait(pause)
    return succeeded


# --- setup, baselines and the check -----------------------------------------------------------------------------


def make_clients(n: int) -> tuple[int, list[str]]:
    """A laboratory with n technologists, each with an API token (keys returned once, as the API gives them)."""
    from django.contrib.auth.models import Group

    from accounts.models import ApiToken, Laboratory, User
    from accounts.roles import TECHNOLOGIST

    lab = Laboratory.objects.create(name="Load benchmark")
    technologist = Group.objects.get(name=TECHNOLOGIST)
    keys = []
    for i in range(n):
        user = User.objects.create_user(f"load-{i}", password=None, laboratory=lab)
        user.groups.add(technologist)
        keys.append(ApiToken.issue(user, f"load benchmark {i}")[1])
    return lab.pk, keys


def find_model(architecture: str):
    from classifier.models import ClassifierModel

    record = ClassifierModel.objects.usable().filter(architecture=architecture, is_bundled=True).first()
    if record is None:
        names = sorted(ClassifierModel.objects.values_list("architecture", flat=True).distinct())
        raise SystemExit(f"No bundled model {architecture!r}; registered: {', '.join(names)}")
    return record


def raw_onnx_rate(record, images: list[tuple[str, bytes]], rounds: int = 3) -> float:
    """Images/s of decode + resize + normalise + ONNX Runtime in this process (batches of 32, decoding on 4
    threads, ONNX Runtime's default threads), on the model's registered ONNX copy; median of ``rounds``."""
    from wbc_ml.inference import OnnxBackend
    from wbc_ml.preprocessing import Normalization, load_pixels

    spec = record.spec()
    if spec.onnx_path is None:
        raise SystemExit(f"{record} has no ONNX copy ({record.onnx_status}): nothing to compare with")
    backend = OnnxBackend(Path(spec.onnx_path))
    normalization = Normalization.from_dict(record.normalization)
    size = record.input_size
    for n in {min(32, len(images)), len(images) % 32 or 32}:  # warm-up: every batch shape used below
        backend.run(np.zeros((n, *size, 3), np.float32))
    seconds = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(rounds):
            started = time.perf_counter()
            for start in range(0, len(images), 32):
                chunk = images[start : start + 32]
                pixels = np.stack(list(pool.map(lambda item: load_pixels(item[1], size), chunk)))
                backend.run(normalization.apply(pixels))
            seconds.append(time.perf_counter() - started)
    return len(images) / statistics.median(seconds)


def wait_ready(stack: Stack, timeout: float = 120) -> None:
    """Until /readyz answers 200: database, S3 storage and a fresh worker heartbeat."""
    import requests

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            response = requests.get(f"{stack.base_url}/readyz", verify=str(stack.cert), timeout=10)
            if response.status_code == 200:
                return
            last = response.text[:300]
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(1)
    raise SystemExit(f"The stack was not ready within {timeout:.0f} s: {last}")


def check_predictions(lab_id: int, batch_urls: list[str], images_per_batch: list[int], singles: int) -> list[str]:
    """Every submitted image is one item with exactly one prediction, and the laboratory has no other prediction
    than those and the single-image ones; the problems found (empty: PASS)."""
    from classifier.models import Prediction
    from reports.models import BatchItem

    problems = []
    for url, expected in zip(batch_urls, images_per_batch, strict=True):
        uid = url.rstrip("/").rsplit("/", 1)[-1]
        items = BatchItem.objects.filter(batch__uid=uid)
        total, linked = items.count(), items.filter(status=BatchItem.Status.DONE, prediction__isnull=False).count()
        if total != expected or linked != expected:
            problems.append(f"batch {uid}: {expected} images sent, {total} items, {linked} done with a prediction")
    made = Prediction.objects.filter(laboratory_id=lab_id).count()
    wanted = sum(images_per_batch) + singles
    if made != wanted:
        problems.append(f"{made} predictions in the laboratory, expected {wanted} (batch images + single images)")
    return problems


# --- the run ----------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    data_dir = Path(os.environ.get("WBC_DATA_DIR", REPO.parent / "shared" / "data")) / "pbc"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20, help="concurrent API clients, one batch each")
    parser.add_argument("--images", type=int, default=100, help="images per batch")
    parser.add_argument("--model", default="enhanced_cnn_v2", help="a bundled model's architecture")
    parser.add_argument("--data", type=Path, default=data_dir, help="PBC folder (one sub-folder per class)")
    parser.add_argument("--synthetic", action="store_true", help="generated JPEGs instead of the PBC images")
    parser.add_argument("--web", type=int, default=2, help="gunicorn web processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per web process (gthread)")
    parser.add_argument("--workers", type=int, default=2, help="background workers")
    parser.add_argument("--onnx-threads", type=int, default=1, help="ONNX Runtime threads per worker")
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432/postgres", help="server URL")
    parser.add_argument("--api-rate", default="1000000/min", help="WBC_API_RATE and WBC_API_SUBMIT_RATE")
    parser.add_argument("--idle-singles", type=int, default=20, help="single-image requests on the idle stack")
    parser.add_argument("--single-pause", type=float, default=0.25, help="seconds between single-image requests")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls of a batch")
    parser.add_argument("--deadline", type=float, default=1800, help="seconds the loaded phase may take at most")
    parser.add_argument("--raw-images", type=int, default=300, help="images timed through raw ONNX Runtime")
    parser.add_argument("--storage", choices=("s3", "local"), default="s3", help="media and model files: S3 (moto) "
                        "or this host's folders, to compare")  # fmt: skip
    parser.add_argument("--redis", default="", help="a Redis URL (e.g. redis://127.0.0.1:6379/0) for the cache "
                        "and the rate counters, as in a multi-host deployment (else PostgreSQL)")  # fmt: skip
    parser.add_argument("--keep-logs", action="store_true", help="keep the stack's folder (logs) afterwards")
    args = parser.parse_args()
    if min(args.users, args.images, args.web, args.workers, args.idle_singles) < 1:
        parser.error("--users, --images, --web, --workers and --idle-singles must be at least 1")
    return args


@dataclass
class Results:
    source: str = ""
    model: str = ""
    onnx_threads_setting: bool = False
    idle_single: list[float] = field(default_factory=list)
    raw_rate: float = float("nan")
    load_seconds: float = float("nan")
    runs: list[UserRun] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    web_rss: dict[int, float] = field(default_factory=dict)
    worker_rss: dict[int, float] = field(default_factory=dict)
    worker_niceness: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def measure(stack: Stack, args: argparse.Namespace, batch_images, single_images, results: Results) -> None:
    """Set up the clients, warm the stack up, take the idle baselines, then the loaded run and the check."""
    import django

    os.environ.update(stack.env)  # this process reads the same database and storage as the stack
    django.setup()
    from django.conf import settings
    from django.db import connections

    results.onnx_threads_setting = hasattr(settings, "WBC_ONNX_THREADS")
    record = find_model(args.model)
    results.model = f"{record.name} v{record.version}"
    lab_id, keys = make_clients(args.users + 1)
    abort = threading.Event()
    clients = [Client(stack, key, results.tally, abort) for key in keys]
    wait_ready(stack)
    try:
        singles, urls, counts = warm_up(stack, args, record.pk, keys[-1], clients, batch_images, single_images)
        idle_tally = Tally()
        idle = Client(stack, keys[-1], idle_tally, abort)
        singles += sum(
            idle.classify(single_images[i % len(single_images)], record.pk) is not None
            for i in range(args.idle_singles)
        )
        results.idle_single = idle_tally.latencies.get("single", [])
        raw_set = [image for batch in batch_images for image in batch][: args.raw_images]
        results.raw_rate = raw_onnx_rate(record, raw_set)
        results.tally.statuses.clear()  # the warm-up's answers are not part of the figures
        results.tally.latencies.clear()
        singles += loaded_run(stack, args, record.pk, clients, batch_images, single_images, results)
        urls += [run.url for run in results.runs if run.url]
        counts += [len(images) for run, images in zip(results.runs, batch_images, strict=True) if run.url]
        results.problems = check_predictions(lab_id, urls, counts, singles)
    finally:
        abort.set()
        connections.close_all()  # before the database is dropped


def warm_up(stack: Stack, args, model_id: int, key: str, clients, batch_images, single_images):
    """Not measured: the model in each web process (single images, a new connection each, so every process gets
    some) and one small batch per worker. Returns the single images classified, the batch URLs and their sizes."""
    singles = sum(
        Client(stack, key, Tally(), clients[0].abort).classify(image, model_id) is not None
        for image in single_images[: 4 * args.web]
    )
    deadline = time.monotonic() + 600
    sizes = [min(8, len(batch_images[i])) for i in range(min(args.workers, len(clients) - 1))]
    urls = [clients[i].submit(batch_images[i][:n], model_id, deadline) for i, n in enumerate(sizes)]
    for url in urls:
        if url is None or clients[0].wait_done(url, deadline, args.poll_interval) is None:
            raise SystemExit("The warm-up batches did not finish; see the worker logs.")
    return singles, urls, sizes


def loaded_run(stack: Stack, args, model_id: int, clients, batch_images, single_images, results: Results) -> int:
    """Every user submits its batch at once and polls it while single images are timed alongside; returns the
    single images classified."""
    start, stop = threading.Event(), threading.Event()
    deadline = time.monotonic() + args.deadline
    pool = ThreadPoolExecutor(max_workers=args.users + 1, thread_name_prefix="client")
    try:
        with PeakRss(stack) as rss:
            side = pool.submit(singles_until, clients[-1], single_images, model_id, stop, args.single_pause)
            users = [
                pool.submit(run_user, client, images, model_id, deadline, args.poll_interval, start)
                for client, images in zip(clients[: args.users], batch_images, strict=True)
            ]
            started = time.perf_counter()
            start.set()
            results.runs = [future.result(timeout=args.deadline + 300) for future in users]
            stop.set()
            singles = side.result(timeout=300)
        finished = [run.finished_at for run in results.runs if run.finished_at is not None]
        results.load_seconds = (max(finished) if finished else time.perf_counter()) - started
        results.web_rss, results.worker_rss = rss.web, rss.workers
        results.worker_niceness = {os.getpriority(os.PRIO_PROCESS, worker.pid) for worker in stack.workers}
        return singles
    finally:
        stop.set()
        clients[0].abort.set()  # on Ctrl+C every client loop ends; the threads are not waited for
        pool.shutdown(wait=False, cancel_futures=True)


# --- the report -------------------------------------------------------------------------------------------------


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f} ms" if values else "-"


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def report(args: argparse.Namespace, results: Results) -> bool:
    """Print the table; True when the prediction check passed."""
    tally, runs = results.tally, results.runs
    lat = tally.latencies
    images = sum(args.images for run in runs if run.body and run.body["status"] == "done")
    failed_images = sum((run.body or {}).get("progress", {}).get("failed", 0) for run in runs)
    unfinished = sum(1 for run in runs if not run.body or run.body["status"] != "done")
    rate = images / results.load_seconds if results.load_seconds > 0 else float("nan")
    s5xx, s429 = tally.count(lambda s: s >= 500), tally.count(lambda s: s == 429)
    s4xx = tally.count(lambda s: 400 <= s < 500 and s != 429)
    transport = sum(tally.transport_errors.values())
    errors = s5xx + s429 + s4xx + transport + failed_images + unfinished
    submit_p95 = percentile(lat.get("submit", []), 95)
    threads = f"{args.onnx_threads} ONNX thread(s) each" if results.onnx_threads_setting else "ONNX threads NOT limited"
    threads += f", niceness {'/'.join(str(n) for n in sorted(results.worker_niceness))}"
    print(
        f"\nLoad test: {args.users} users x {args.images} images ({results.source}), model {results.model}; "
        f"{args.web} web processes (gthread x{args.threads}, HTTPS), {args.workers} workers ({threads}); "
        f"PostgreSQL + {'S3 (moto)' if args.storage == 's3' else 'local folders'}{' + Redis' if args.redis else ''} "
        "on loopback; "
        f"{os.cpu_count()} CPU cores (client on the same machine)\n"
    )
    rows = [
        ("throughput, end to end (submit to last batch done)", f"{rate:.1f} img/s", ""),
        ("  raw ONNX Runtime in-process, same images, idle", f"{results.raw_rate:.1f} img/s", ""),
        ("  ratio end to end / raw", f"{rate / results.raw_rate:.2f}", ""),
        ("batches done / submitted", f"{len(runs) - unfinished} / {len(runs)} in {results.load_seconds:.1f} s", ""),
        ("submit p50 / p95", f"{ms(lat.get('submit', []), 50)} / {ms(lat.get('submit', []), 95)}",
         f"p95 <= {GOAL_SUBMIT_P95_S:.0f} s: {verdict(submit_p95 <= GOAL_SUBMIT_P95_S)}"),
        ("poll p50 / p95", f"{ms(lat.get('poll', []), 50)} / {ms(lat.get('poll', []), 95)}", ""),
        ("single image idle p50 / p95", f"{ms(results.idle_single, 50)} / {ms(results.idle_single, 95)}", ""),
        ("single image under load p50 / p95", f"{ms(lat.get('single', []), 50)} / {ms(lat.get('single', []), 95)}",
         f"{len(lat.get('single', []))} requests"),
        ("  ratio under load / idle (p50)",
         f"{percentile(lat.get('single', []), 50) / percentile(results.idle_single, 50):.2f}", ""),
        ("requests answered (all kinds)", f"{sum(tally.statuses.values())}", ""),
        ("5xx / 429 / other 4xx / transport errors", f"{s5xx} / {s429} / {s4xx} / {transport}", ""),
        ("failed images / unfinished batches", f"{failed_images} / {unfinished}", ""),
        ("errors in all", f"{errors}", f"0: {verdict(errors == 0)}"),
    ]  # fmt: skip
    for i, (pid, mb) in enumerate(sorted(results.web_rss.items()), 1):
        rows.append((f"peak RSS web process {i} (pid {pid})", f"{mb:.0f} MB", f"<= {GOAL_WEB_RSS_MB:.0f} MB: "
                     f"{verdict(mb <= GOAL_WEB_RSS_MB)}"))  # fmt: skip
    for i, (pid, mb) in enumerate(sorted(results.worker_rss.items()), 1):
        rows.append((f"peak RSS worker {i} (pid {pid})", f"{mb:.0f} MB", ""))
    rows.append(("every image exactly one prediction (database)", "FAIL" if results.problems else "PASS", ""))
    print(f"{'figure':<52}{'value':>24}   goal")
    for name, value, goal in rows:
        print(f"{name:<52}{value:>24}   {goal}".rstrip())
    for problem in results.problems + [f"user: {run.error}" for run in runs if run.error]:
        print(f"  ! {problem}")
    for kind, n in sorted(tally.transport_errors.items()):
        print(f"  ! transport error {kind}: {n}")
    return not results.problems


def load_all_images(args: argparse.Namespace) -> tuple[list[list[tuple[str, bytes]]], list[tuple[str, bytes]], str]:
    """Each user's batch and a separate set of single images."""
    n, singles = args.users * args.images, 20
    if args.synthetic or not args.data.is_dir():
        if not args.synthetic:
            print(f"{args.data} is missing: using generated images (--synthetic).")
        pool = synthetic_images(min(n, 500) + singles)
        images = [pool[i % (len(pool) - singles)] for i in range(n)] + pool[-singles:]
        source = "generated 360x363 JPEGs"
    else:
        images, source = pbc_images(args.data, n + singles), "real PBC JPEGs"
    batches = [images[u * args.images : (u + 1) * args.images] for u in range(args.users)]
    return batches, images[n:], source


def main() -> int:
    args = parse_args()
    batch_images, single_images, source = load_all_images(args)
    results = Results(source=source)
    workdir = Path(tempfile.mkdtemp(prefix="wbc-load-"))
    keep = args.keep_logs
    try:
        with signals_unwind():
            stack_options = {"web_processes": args.web, "threads": args.threads, "workers": args.workers}
            stack_options.update(s3=args.storage == "s3", redis=args.redis)
            with running_stack(
                workdir, postgres=args.postgres, onnx_threads=args.onnx_threads, api_rate=args.api_rate, **stack_options
            ) as stack:
                print(f"Stack up at {stack.base_url} (logs in {workdir / 'logs'}); measuring ...", flush=True)
                measure(stack, args, batch_images, single_images, results)
    except KeyboardInterrupt:
        keep = True
        print(f"\nInterrupted: every child process was stopped and the database dropped (logs: {workdir / 'logs'}).")
        return 130
    except BaseException:
        keep = True
        print(f"The stack's logs are kept in {workdir / 'logs'}.", file=sys.stderr)
        raise
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    passed = report(args, results)
    if keep:
        print(f"\nlogs: {workdir / 'logs'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
