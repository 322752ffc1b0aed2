"""Batch throughput: raw in-process inference versus the whole platform over HTTP.

    python benchmarks/batch_throughput.py [--model mobilenet_v2_finetuned] [--images 100] [--data ../shared/data/pbc]

(a) the same N real PBC JPEGs (360x363) decoded, resized and classified in this process in batches of 32,
    through ONNX Runtime and through TensorFlow ``predict_on_batch`` (the baseline), and
(b) the same images uploaded as one batch to a running gunicorn web server and background worker (fresh
    SQLite database and media folder), timed from the upload until the report is complete.

After a warm-up, 7 rounds each time every path once, in turn; medians are reported. Prints images/s for
each, the ratio of (b) to the faster raw path (the median of the per-round ratios), and the peak RSS of
the web and worker processes. Without the data folder it uses realistic generated 360x363 JPEG smears instead.

Then where (b)'s time goes: the CPU seconds each path used per batch (this process for (a); the web server and the
worker, with their threads, for (b)) and how many cores that kept busy; how long the upload takes to be answered;
and, timed one by one in this process on the same images, each step a batch image goes through, per image, beside
the raw ONNX Runtime path's time per image: decoding and resizing (in both paths) and the gallery thumbnail (the
worker's only).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROUNDS = 7  # rounds of timing every path once; medians are reported (a shared CPU is noisy)
END_TO_END = "(b) end to end: HTTP upload -> worker -> report"
WEB, WORKER = "    of which the web server", "    of which the worker"


def load_images(data: Path, n: int) -> list[tuple[str, bytes]]:
    if data.is_dir():
        from wbc_ml import datasets

        test_split = datasets.split_samples(datasets.list_images(data))["test"]
        chosen = test_split[:: max(1, len(test_split) // n)][:n]
        return [(s.name, s.path.read_bytes()) for s in chosen]
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        pixels = rng.normal((225, 190, 200), 12, size=(363, 360, 3))
        yy, xx = np.mgrid[0:363, 0:360]
        pixels[(yy - 180) ** 2 + (xx - 180) ** 2 < 70**2] = (120, 60, 150)
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=92)
        images.append((f"synthetic_{i}.jpg", buffer.getvalue()))
    return images


def raw_paths(card_path: Path, images: list[tuple[str, bytes]], onnx_dir: Path) -> dict[str, Callable[[], float]]:
    """For each backend, a function that times one pass (seconds) of decode + resize + normalise + classify."""
    from concurrent.futures import ThreadPoolExecutor

    from wbc_ml.inference import KerasBackend, OnnxBackend, load_keras_model
    from wbc_ml.onnx_export import export_onnx
    from wbc_ml.preprocessing import Normalization, load_pixels

    card = json.loads(card_path.read_text())
    size = tuple(card["input_size"])
    normalization = Normalization.from_dict(card["normalization"])
    model_path = card_path.parent / card["file"]
    onnx_path = onnx_dir / "bench.onnx"
    export_onnx(model_path, onnx_path, size, card["normalization"])
    backends = {
        "TensorFlow predict_on_batch": KerasBackend(load_keras_model(model_path), with_features=True),
        "ONNX Runtime": OnnxBackend(onnx_path),
    }
    pool = ThreadPoolExecutor(max_workers=4)

    def timer(backend) -> Callable[[], float]:
        for warm in {min(32, len(images)), len(images) % 32 or 32}:  # warm-up: every batch shape used below
            backend.run(np.zeros((warm, *size, 3), np.float32))

        def one_pass() -> float:
            started = time.perf_counter()
            for start in range(0, len(images), 32):
                chunk = images[start : start + 32]
                pixels = np.stack(list(pool.map(lambda item: load_pixels(item[1], size), chunk)))
                backend.run(normalization.apply(pixels))
            return time.perf_counter() - started

        return one_pass

    return {name: timer(backend) for name, backend in backends.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_children(pid: int) -> list[int]:
    """The process and its children (gunicorn's master and its worker)."""
    try:
        return [pid, *(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    except OSError:
        return [pid]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a process and its children have used so far."""
    total = 0
    for p in with_children(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process and its children, in MB."""
    total = 0
    for p in with_children(pid):
        try:
            match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
        except OSError:
            continue
        if match:
            total += int(match.group(1))
    return total / 1024


@contextmanager
def running_platform(model_name: str, workdir: Path) -> Iterator[tuple[Callable[[list], float], list[float], int, int]]:
    """A fresh gunicorn web server and background worker; yields (time_batch, the seconds until each of its uploads
    was answered, web pid, worker pid)."""
    import requests

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "wbcsite.settings",
        "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
        "MEDIA_ROOT": str(workdir / "media"),
        "WBC_ONNX_DIR": str(workdir / "onnx"),
        "SECRET_KEY": "benchmark-only-" + "x" * 50,
        "AXES_ENABLED": "0",
        "LOG_LEVEL": "WARNING",
    }
    python = sys.executable

    def manage(*args: str) -> str:
        return subprocess.run(
            [python, "manage.py", *args], cwd=REPO, env=env, check=True, capture_output=True, text=True
        ).stdout

    manage("migrate", "--noinput")
    manage("register_models")
    manage(
        "shell",
        "-c",
        "from classifier.models import *; from django.contrib.auth.models import Group;"
        "lab=Laboratory.objects.create(name='Bench');"
        "u=User.objects.create_user('bench', password='bench-password-123', laboratory=lab);"
        "u.groups.add(Group.objects.get(name='Technologist'))",
    )
    model_id = manage(
        "shell",
        "--verbosity",
        "0",
        "-c",
        f"from classifier.models import ClassifierModel as M; print(M.objects.get(architecture='{model_name}').pk)",
    ).strip()
    port = free_port()
    web = subprocess.Popen(
        [
            python,
            "-m",
            "gunicorn",
            "wbcsite.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "--timeout",
            "300",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    worker = subprocess.Popen(
        [python, "manage.py", "run_worker"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        session = requests.Session()
        for _ in range(120):
            try:
                session.get(f"{base}/accounts/login/", timeout=30)
                break
            except requests.RequestException:  # not listening yet, or still importing the app
                time.sleep(0.5)
        session.post(
            f"{base}/accounts/login/",
            data={
                "username": "bench",
                "password": "bench-password-123",
                "csrfmiddlewaretoken": session.cookies["csrftoken"],
            },
            headers={"Referer": f"{base}/accounts/login/"},
        )

        uploads: list[float] = []  # seconds until each upload was answered, in the order of the batches

        def time_batch(batch_images: list[tuple[str, bytes]]) -> float:
            """Seconds from the upload until the report is complete."""
            page = session.get(f"{base}/batches/new/")
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
            started = time.perf_counter()
            response = session.post(  # timed below: how long the upload takes to be answered
                f"{base}/batches/new/",
                data={"name": "bench", "model": model_id, "csrfmiddlewaretoken": token, "urls": ""},
                files=[("files", (name, data, "image/jpeg")) for name, data in batch_images],
                headers={"Referer": f"{base}/batches/new/"},
                allow_redirects=False,
            )
            uploads.append(time.perf_counter() - started)
            if response.status_code != 302:
                errors = re.findall(r'role="alert"[^>]*>(.*?)</div>', response.text, re.S)
                raise RuntimeError(f"batch upload answered {response.status_code}: {errors or response.text[:300]}")
            status_url = base + response.headers["Location"] + "status.json"
            seen = -1
            while True:  # long polling, as the live page does: each answer comes when a chunk is done
                status = session.get(status_url, params={"wait": 10, "after": seen}).json()
                if status["status"] in ("done", "failed"):
                    break
                seen = status["done"] + status["failed"]
            elapsed = time.perf_counter() - started
            assert status["done"] == len(batch_images), status
            return elapsed

        yield time_batch, uploads, web.pid, worker.pid
    finally:
        for process in (web, worker):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def step_costs(images: list[tuple[str, bytes]], size: tuple[int, int]) -> dict[str, float]:
    """Milliseconds per image of each step a batch image goes through, one at a time (the best of 3 passes)."""
    from reports.thumbnails import make_thumbnail
    from wbc_ml.preprocessing import decode_image, resize

    decoded = [decode_image(data) for _, data in images]
    steps = {
        "decode (JPEG to RGB)": lambda: [decode_image(data) for _, data in images],
        f"resize to {size[0]}x{size[1]}": lambda: [resize(image, size) for image in decoded],
        "gallery thumbnail (worker only)": lambda: [make_thumbnail(image) for image in decoded],
    }
    costs = {}
    for name, step in steps.items():
        best = min(timed(step) for _ in range(3))
        costs[name] = 1000 * best / len(images)
    return costs


def timed(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2_finetuned")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "pbc")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wbcsite.settings")
    import django

    django.setup()
    images = load_images(args.data, args.images)
    source = "real PBC test-split JPEGs" if args.data.is_dir() else "generated 360x363 JPEGs"
    workdir = Path(tempfile.mkdtemp(prefix="wbc-bench-"))
    timings: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}  # CPU seconds of each pass: this process for (a), web + worker for (b)
    try:
        raw = raw_paths(REPO / "models" / f"{args.model}.json", images, workdir)
        with running_platform(args.model, workdir) as (time_batch, uploads, web_pid, worker_pid):
            # A first, untimed batch warms both processes (model load, ONNX session, every chunk shape): the timed
            # rounds are the steady state of a lab uploading slide after slide. Each round times every path once,
            # one after the other, so a slower or faster spell of a shared CPU touches all of them alike.
            time_batch(images)
            uploads.clear()  # the warm-up's
            for _ in range(ROUNDS):
                for name, one_pass in raw.items():
                    started = time.process_time()
                    timings.setdefault(name, []).append(one_pass())
                    cpu.setdefault(name, []).append(time.process_time() - started)
                web_cpu, worker_cpu = cpu_seconds(web_pid), cpu_seconds(worker_pid)
                timings.setdefault(END_TO_END, []).append(time_batch(images))
                cpu.setdefault(WEB, []).append(cpu_seconds(web_pid) - web_cpu)
                cpu.setdefault(WORKER, []).append(cpu_seconds(worker_pid) - worker_cpu)
                cpu.setdefault(END_TO_END, []).append(cpu[WEB][-1] + cpu[WORKER][-1])
            web_rss, worker_rss = peak_rss_mb(web_pid), peak_rss_mb(worker_pid)
            upload_s = statistics.median(uploads)
        card = json.loads((REPO / "models" / f"{args.model}.json").read_text())
        costs = step_costs(images, tuple(card["input_size"]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rate = {name: len(images) / statistics.median(values) for name, values in timings.items()}
    fastest = max(rate[name] for name in raw)
    ratios = [
        min(timings[name][i] for name in raw) / timings[END_TO_END][i] for i in range(ROUNDS)
    ]  # per round: end-to-end throughput / fastest raw throughput
    print(f"\n{len(images)} {source}, model {args.model}, {os.cpu_count()} CPU cores, median of {ROUNDS} rounds\n")
    print(f"{'path':<50}{'images/s':>10}{'ms/image':>10}{'vs fastest raw':>16}")
    for name, value in rate.items():
        label = END_TO_END if name == END_TO_END else f"(a) raw, in-process: {name}"
        print(f"{label:<50}{value:>10.1f}{1000 / value:>10.1f}{value / fastest:>15.2f}x")
    baseline = rate["TensorFlow predict_on_batch"]
    print(f"\nONNX Runtime vs TensorFlow predict_on_batch: {rate['ONNX Runtime'] / baseline:.2f}x")
    print(
        f"end-to-end / fastest raw path: {statistics.median(ratios):.2f} (goal >= 0.9; "
        f"per round {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    print(f"peak RSS: web (gunicorn, 1 worker) {web_rss:.0f} MB, background worker {worker_rss:.0f} MB")
    print(f"\nCPU per batch of {len(images)} (median of the rounds)   CPU s   cores busy   vs ONNX Runtime's CPU")
    raw_cpu = statistics.median(cpu["ONNX Runtime"])
    for name in ("ONNX Runtime", END_TO_END, WEB, WORKER):
        label = name if name in (END_TO_END, WEB, WORKER) else f"(a) raw, in-process: {name}"
        seconds = statistics.median(cpu[name])
        wall = timings[END_TO_END if name in (WEB, WORKER) else name]
        busy = statistics.median(c / t for c, t in zip(cpu[name], wall, strict=True))
        print(f"{label:<50}{seconds:>6.2f}{busy:>13.2f}{seconds / raw_cpu:>21.2f}x")
    raw_ms = 1000 / fastest
    print(f"\nwhere (b)'s time goes, per image, against the fastest raw path's {raw_ms:.2f} ms per image")
    print(f"{'step':<50}{'ms/image':>10}{'vs raw':>16}")
    upload_ms = 1000 * upload_s / len(images)
    print(f"{'upload answered (median of the timed rounds)':<50}{upload_ms:>10.2f}{upload_ms / raw_ms:>15.2f}x")
    for name, value in costs.items():
        print(f"{name:<50}{value:>10.2f}{value / raw_ms:>15.2f}x")


if __name__ == "__main__":
    main()
