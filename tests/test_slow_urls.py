"""Slow image servers cannot freeze the site: batch URLs are fetched by the worker within a budget, a single-image
URL has a short deadline and a per-user cap, and a URL's credentials are never stored or echoed.

The servers here are real: a local HTTP server on 127.0.0.1 that drips one byte every 2 s, and the platform
itself served by gunicorn exactly as ``scripts/run`` starts it (2 processes × 4 threads), so 14 parallel
submissions would take every thread if a submit waited for its URLs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.management import call_command
from django.urls import reverse

from accounts.models import ApiToken
from classifier.models import Prediction
from reports.models import Batch, BatchItem
from reports.submission import submit_batch, url_entries
from reports.uploads import NamedBytes
from tests.conftest import REPO, image_bytes, test_database_url

pytestmark = pytest.mark.django_db(transaction=True)

PNG = image_bytes(size=(80, 80))
DRIP_SECONDS = 2.0


class DripHandler(BaseHTTPRequestHandler):
    """/cell.png answers at once; /slow*.png sends its headers, then one byte every 2 s (never finishing in time)."""

    protocol_version = "HTTP/1.1"
    stop = threading.Event()
    slow_started = threading.Event()  # a /slow* download has reached this server

    def do_GET(self):
        if self.path.startswith("/slow"):
            self.slow_started.set()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        if not self.path.startswith("/slow"):
            self.wfile.write(PNG)
            return
        try:
            for byte in PNG:
                if self.stop.wait(DRIP_SECONDS):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except OSError:  # the client gave up: that is the point
            return

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server(settings):
    settings.WBC_URL_ALLOWED_PRIVATE_HOSTS = {"localhost"}
    DripHandler.stop.clear()
    DripHandler.slow_started.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), DripHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{httpd.server_address[1]}"
    DripHandler.stop.set()
    httpd.shutdown()
    httpd.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post_json(url: str, body: dict, headers: dict, timeout: float) -> tuple[int, dict, float]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={**headers, "Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    return status, json.loads(payload or b"{}"), time.monotonic() - started


@pytest.fixture
def web(settings, tiny_record, tmp_path):
    """The platform served by gunicorn (as scripts/run does) on the test database; yields its base URL."""
    call_command("createcachetable")  # the API rate counters' table (REDIS_URL unset)
    port = _free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "wbcsite.settings",
        "DATABASE_URL": test_database_url(),
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "WBC_MODELS_DIR": str(settings.WBC_MODELS_DIR),
        "WBC_WORKER_WAKEUP_DIR": str(settings.WBC_WORKER_WAKEUP_DIR),
        "WBC_URL_ALLOWED_PRIVATE_HOSTS": "localhost",
        "WBC_API_SUBMIT_RATE": "1000/min",
        "REDIS_URL": "",
    }
    command = [sys.executable, "-m", "gunicorn", "wbcsite.wsgi:application", "--bind", f"127.0.0.1:{port}"]
    command += ["--workers", "2", "--worker-class", "gthread", "--threads", "4", "--timeout", "120"]
    log = (tmp_path / "gunicorn.log").open("w")
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "gunicorn.log").read_text()[-3000:]
            try:
                if _get(base + reverse("login"), timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_fourteen_slow_url_submissions_leave_the_site_answering(web, image_server, technologist):
    _token, key = ApiToken.issue(technologist, "LIS")
    auth = {"Authorization": f"Token {key}"}
    url = web + reverse("api:batch-list")
    slow = [f"{image_server}/slow-{i}.png" for i in range(14)]
    with ThreadPoolExecutor(max_workers=14) as pool:
        submissions = [
            pool.submit(_post_json, url, {"urls": [one], "external_id": f"SLOW-{i}"}, auth, 30)
            for i, one in enumerate(slow)
        ]
        time.sleep(1.0)  # the submissions are in flight (with the old code, each holds a thread for 60 s)
        waits = []
        for _ in range(3):
            started = time.monotonic()
            status, body = _get(web + reverse("api:me"), timeout=20, headers=auth)
            waits.append(time.monotonic() - started)
            assert status == 200, body[:300]
        answers = [future.result() for future in submissions]
    print(f"GET /api/v1/me/ with 14 slow submissions in flight: {', '.join(f'{w:.3f}' for w in waits)} s")
    print(f"submissions answered in {max(elapsed for _, _, elapsed in answers):.3f} s at most")
    # The issue's bound is 1 s (it took 116 s before the fix); the worst of the three may meet a busy 2-core CI
    # machine and 14 SQLite writers: the bounds leave room for that and still catch the old 60-s hold.
    assert sorted(waits)[1] < 3.0 and max(waits) < 10.0, waits
    for status, body, elapsed in answers:
        assert status == 202, body
        assert elapsed < 15, elapsed  # the submit answers at once (before the fix: 60 s), whatever the server does
        assert body["progress"]["pending"] == 1
    items = BatchItem.objects.filter(batch__external_id__startswith="SLOW-")
    assert items.count() == 14
    for item in items:
        assert item.status == BatchItem.Status.PENDING and not item.image
        assert item.source_url == item.original_filename and item.source_url in slow


def test_the_worker_fetches_within_the_batch_budget_and_fails_the_rest_with_their_reason(
    settings, image_server, technologist, tiny_record
):
    settings.WBC_BATCH_URL_BUDGET_SECONDS = 3
    # the fast URL first; then more slow ones than the worker downloads at once, so one never gets to start
    urls = [f"{image_server}/cell.png"] + [f"{image_server}/slow-{i}.png" for i in range(9)]
    entries = [NamedBytes("file.png", image_bytes()), *url_entries(urls, name_by_url=True)]
    batch = submit_batch(technologist, entries, tiny_record, name="Slow lab server")
    assert batch.items.filter(status=BatchItem.Status.PENDING).count() == 11  # nothing fetched while submitting
    call_command("run_worker", "--batch")
    batch.refresh_from_db()
    assert batch.status == Batch.Status.DONE, batch.error
    items = {item.original_filename: item for item in batch.items.all()}
    assert items["file.png"].status == BatchItem.Status.DONE
    fast = items[urls[0]]
    assert fast.status == BatchItem.Status.DONE and fast.prediction.width == 80 and fast.image
    slow = [items[one] for one in urls[1:]]
    assert all(item.status == BatchItem.Status.FAILED and not item.image for item in slow)
    reasons = " ".join(item.error for item in slow)
    assert "took longer than 3 seconds" in reasons  # started, but too slow
    assert "3 seconds for downloading URLs ran out" in reasons  # never started: the budget was spent
    assert Prediction.objects.count() == 2


def test_a_single_image_url_has_a_short_deadline_and_a_cap_per_user(settings, image_server, tech_client, tiny_record):
    settings.WBC_URL_FETCH_SECONDS = 3
    settings.WBC_URL_FETCHES_PER_USER = 1
    post = reverse("classifier:classify_url")
    answers = {}

    def classify(name: str, url: str) -> None:
        answers[name] = tech_client.post(post, {"url": url, "model": tiny_record.pk})

    first = threading.Thread(target=classify, args=("slow", f"{image_server}/slow.png"))
    started = time.monotonic()
    first.start()
    assert DripHandler.slow_started.wait(30)  # the first download is running
    classify("second", f"{image_server}/cell.png")
    first.join(timeout=30)
    assert not first.is_alive() and time.monotonic() - started < 15
    assert answers["second"].status_code == 400
    assert "already have 1 image download running" in answers["second"].text
    assert answers["slow"].status_code == 400 and "took longer than 3 seconds" in answers["slow"].text
    classify("after", f"{image_server}/cell.png")  # the slot is free again
    assert answers["after"].status_code == 302
    assert Prediction.objects.count() == 1


def test_credentials_in_a_url_are_never_stored_or_echoed(settings, image_server, technologist, tiny_record):
    from rest_framework.test import APIClient

    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "api_throttle": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "slow-url-tests"},
    }
    _token, key = ApiToken.issue(technologist, "LIS")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    secret = image_server.replace("http://", "http://lab-user:s3cret-pw@") + "/cell.png"
    good = f"{image_server}/cell.png"
    response = api.post(reverse("api:batch-list"), {"urls": [secret, good]}, format="json")
    assert response.status_code == 202, response.content
    assert b"s3cret" not in response.content and b"lab-user" not in response.content
    batch = Batch.objects.get()
    refused, pending = batch.items.order_by("position")
    assert refused.original_filename == good and refused.status == BatchItem.Status.FAILED
    assert "user name or password" in refused.error
    assert pending.status == BatchItem.Status.PENDING and pending.source_url == good
    stored = json.dumps(list(BatchItem.objects.values("original_filename", "source_url", "error")))
    assert "s3cret" not in stored and "lab-user" not in stored
    call_command("run_worker", "--batch")
    detail = api.get(reverse("api:batch-detail", args=[batch.uid]))
    assert detail.json()["status"] == "done"
    assert b"s3cret" not in detail.content and b"lab-user" not in detail.content
    assert [r["filename"] for r in detail.json()["results"]] == [good, good]
