"""Single-image latency over HTTPS: API classify, then fetching its Grad-CAM, for the CNN and MobileNetV2.

    python benchmarks/single_latency.py [--requests 40] [--models enhanced_cnn_v2,mobilenet_v2_finetuned]

Starts the platform itself in a temporary folder: a fresh SQLite database, the chosen bundled models registered
(and exported to ONNX) by ``register_models``, a laboratory, a technologist and an API token, a self-signed
certificate, and gunicorn over TLS (one process, gthread; no batch worker: a single image is classified in the
request). Then, per model, after a warm-up, each round POSTs one real PBC cell to ``/api/v1/predictions/`` and GETs
its ``saliency?method=gradcam`` (a new prediction each time, so every map is really made and encoded).

Prints p50/p90 of classify, of the Grad-CAM fetch and of both together, beside two baselines measured in this same
run: the raw ONNX Runtime call on one prepared image in this process, and classify alone over HTTPS (the ratio
"with Grad-CAM / classify only" is what the map costs). Also the web process's peak RSS and whether it loaded
TensorFlow. Goals (issue 17): classify + Grad-CAM p50 <= 60 ms for MobileNetV2, <= 30 ms for the CNN.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from batch_throughput import free_port, load_images, peak_rss_mb  # noqa: E402

WARM_UP = 5
OPENSSL_SELF_SIGNED = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
OPENSSL_SELF_SIGNED += ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
GUNICORN = [sys.executable, "-m", "gunicorn", "wbcsite.wsgi:application", "--workers", "1", "--worker-class", "gthread"]
GUNICORN += ["--threads", "4", "--timeout", "300"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def prepare_models(models: list[str], folder: Path) -> None:
    """The chosen bundled cards with their files, so register_models exports only those."""
    folder.mkdir()
    for name in models:
        card = json.loads((REPO / "models" / f"{name}.json").read_text())
        for file_name in [f"{name}.json", card["file"], (card.get("ood") or {}).get("file")]:
            if file_name:
                shutil.copy(REPO / "models" / file_name, folder / file_name)


def start_platform(workdir: Path, models: list[str]) -> tuple[subprocess.Popen, str, Path, str, dict]:
    """gunicorn over TLS on a fresh database; returns (process, base URL, certificate, token, env)."""
    import requests

    prepare_models(models, workdir / "models")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "wbcsite.settings",
        "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
        "MEDIA_ROOT": str(workdir / "media"),
        "WBC_MODELS_DIR": str(workdir / "models"),
        "WBC_ONNX_DIR": str(workdir / "onnx"),
        "SECRET_KEY": "benchmark-only-" + "x" * 50,
        "AXES_ENABLED": "0",
        "LOG_LEVEL": "WARNING",
        "WBC_API_RATE": "100000/min",
        "WBC_API_SUBMIT_RATE": "100000/min",
    }

    def manage(*args: str) -> str:
        command = [sys.executable, "manage.py", *args]
        return subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout

    manage("migrate", "--noinput")
    manage("createcachetable")
    manage("register_models")
    token = manage(
        "shell",
        "--verbosity",
        "0",
        "-c",
        "from accounts.models import ApiToken, Laboratory, User; from django.contrib.auth.models import Group;"
        "lab = Laboratory.objects.create(name='Bench');"
        "u = User.objects.create_user('bench', password='bench-password-123', laboratory=lab);"
        "u.groups.add(Group.objects.get(name='Technologist'));"
        "print(ApiToken.issue(u, 'bench')[1])",
    ).strip()
    cert, key = workdir / "tls.crt", workdir / "tls.key"
    subprocess.run(
        [*OPENSSL_SELF_SIGNED, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    port = free_port()
    web = subprocess.Popen(
        [*GUNICORN, "--bind", f"127.0.0.1:{port}", "--certfile", str(cert), "--keyfile", str(key)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"https://127.0.0.1:{port}"
    for _ in range(240):
        try:
            requests.get(f"{base}/healthz", verify=cert, timeout=30)
            break
        except requests.RequestException:  # not listening yet
            time.sleep(0.5)
    return web, base, cert, token, env


def model_ids(session, base: str) -> dict[str, int]:
    models = session.get(f"{base}/api/v1/models/").json()
    rows = models["results"] if isinstance(models, dict) else models
    return {row["architecture"]: row["id"] for row in rows}


def raw_onnx_seconds(workdir: Path, architecture: str, image: bytes, rounds: int) -> list[float]:
    """Baseline: one prepared image through the registered ONNX copy in this process (no HTTP, no database)."""
    from wbc_ml.inference import OnnxBackend
    from wbc_ml.preprocessing import Normalization, load_pixels

    card = json.loads((REPO / "models" / f"{architecture}.json").read_text())
    (copy,) = (workdir / "onnx").glob(f"{card['sha256'][:20]}-*.onnx")  # the registry names it by the file's sha256
    backend = OnnxBackend(copy)
    batch = Normalization.from_dict(card["normalization"]).apply(load_pixels(image, tuple(card["input_size"]))[None])
    times = []
    for i in range(WARM_UP + rounds):
        started = time.perf_counter()
        backend.run_all(batch)
        if i >= WARM_UP:
            times.append(time.perf_counter() - started)
    return times


def measure(session, base: str, model_id: int, images: list[tuple[str, bytes]], rounds: int) -> dict[str, list]:
    """Per round: classify (POST) then fetch its Grad-CAM (GET); and classify alone, alternating with it."""
    timings: dict[str, list] = {"classify": [], "gradcam": [], "both": [], "classify_only": []}
    for i in range(WARM_UP + rounds):
        name, data = images[i % len(images)]
        started = time.perf_counter()
        response = session.post(
            f"{base}/api/v1/predictions/", files={"file": (name, data, "image/jpeg")}, data={"model": model_id}
        )
        classified = time.perf_counter()
        assert response.status_code == 201, response.text[:300]
        overlay = session.get(response.json()["saliency"]["gradcam"])
        done = time.perf_counter()
        assert overlay.status_code == 200 and overlay.headers["Content-Type"] == "image/webp", overlay.text[:300]
        alone_started = time.perf_counter()
        alone = session.post(
            f"{base}/api/v1/predictions/", files={"file": (name, data, "image/jpeg")}, data={"model": model_id}
        )
        alone_done = time.perf_counter()
        assert alone.status_code == 201, alone.text[:300]
        if i >= WARM_UP:
            timings["classify"].append(classified - started)
            timings["gradcam"].append(done - classified)
            timings["both"].append(done - started)
            timings["classify_only"].append(alone_done - alone_started)
    return timings


def loads_tensorflow(pid: int) -> bool:
    """Whether the process (or a child of it) mapped a TensorFlow library."""
    pids = [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return any("tensorflow" in Path(f"/proc/{p}/maps").read_text() for p in pids if Path(f"/proc/{p}/maps").exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--models", default="enhanced_cnn_v2,mobilenet_v2_finetuned")
    default_data = Path(os.environ.get("WBC_DATA_DIR", REPO.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=default_data)
    args = parser.parse_args()
    import requests

    models = args.models.split(",")
    images = load_images(args.data / "pbc", 10)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.requests} requests per model")
    with tempfile.TemporaryDirectory(prefix="wbc-latency-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        web, base, cert, token, _env = start_platform(workdir, models)
        print(f"platform ready in {time.perf_counter() - started:.0f} s (migrate, register + ONNX export, TLS)")
        try:
            session = requests.Session()
            session.trust_env = False  # REQUESTS_CA_BUNDLE and proxies from the environment would override verify
            session.verify = str(cert)
            session.headers["Authorization"] = f"Token {token}"
            ids = model_ids(session, base)
            rows = []
            for architecture in models:
                timings = measure(session, base, ids[architecture], images, args.requests)
                raw = raw_onnx_seconds(workdir, architecture, images[0][1], args.requests)
                rows.append((architecture, timings, raw))
            rss, tensorflow = peak_rss_mb(web.pid), loads_tensorflow(web.pid)
        finally:
            os.killpg(web.pid, signal.SIGTERM)
            web.wait(timeout=30)
    header = (
        f"{'model':24} {'classify p50/p90':>17} {'Grad-CAM GET':>14} {'classify+Grad-CAM':>18} "
        f"{'classify only':>14} {'raw ONNX p50':>13} {'ratio p50':>10}"
    )
    print()
    print(header)
    print("-" * len(header))
    for architecture, t, raw in rows:
        both, alone = statistics.median(t["both"]), statistics.median(t["classify_only"])
        print(
            f"{architecture:24} {percentile(t['classify'], 50):7.1f}/{percentile(t['classify'], 90):<7.1f}ms "
            f"{percentile(t['gradcam'], 50):6.1f}/{percentile(t['gradcam'], 90):<5.1f}ms "
            f"{percentile(t['both'], 50):8.1f}/{percentile(t['both'], 90):<7.1f}ms "
            f"{percentile(t['classify_only'], 50):11.1f} ms {percentile(raw, 50):10.1f} ms {both / alone:9.2f}x"
        )
    print()
    print("ratio p50 = (classify + Grad-CAM) / classify only, both over HTTPS in this run.")
    print(f"web process: peak RSS {rss:.0f} MB, TensorFlow loaded: {'yes' if tensorflow else 'no'}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
