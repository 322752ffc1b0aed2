"""API rate limits hold under concurrency: many threads on one token against a real multi-threaded server.

The counters are atomic (the database cache by default, Redis when ``REDIS_URL`` is set), so exactly the
allowed number of requests pass and the rest are 429 with a Retry-After. Run this file with
``DATABASE_URL=postgres://…`` and with ``REDIS_URL=redis://127.0.0.1:6379/15`` too.
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from django.core.cache import caches
from django.urls import reverse

from accounts.authentication import THROTTLE_CACHE
from accounts.models import ApiToken

THREADS = 40
REQUESTS = 80
WINDOW_SECONDS = 3600  # the rate below is per hour; a burst that straddles two windows is retried once


def _get(base: str, path: str, key: str) -> tuple[int, dict, str]:
    parts = urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("GET", path, headers={"Authorization": f"Token {key}"})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def _burst(base: str, path: str, key: str) -> tuple[list[tuple[int, dict, str]], bool]:
    """REQUESTS requests from THREADS threads at once; also says whether they all fell in one rate window."""
    start = time.time()
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(lambda _n: _get(base, path, key), range(REQUESTS)))
    return results, int(start // WINDOW_SECONDS) == int(time.time() // WINDOW_SECONDS)


@pytest.fixture
def throttle_cache():
    cache = caches[THROTTLE_CACHE]
    cache.clear()  # the cache table is not a model: transactional tests do not empty it
    yield cache
    cache.clear()


@pytest.mark.parametrize(
    ("setting", "path"),
    [("WBC_API_RATE", "api:me"), ("WBC_API_SUBMIT_RATE", "api:me")],
    ids=["api-rate", "submit-rate-not-counted-for-reads"],
)
def test_parallel_requests_on_one_token_pass_exactly_the_rate(
    live_server, technologist, settings, throttle_cache, setting, path
):
    settings.WBC_API_RATE = "10/hour" if setting == "WBC_API_RATE" else "1000/hour"
    settings.WBC_API_SUBMIT_RATE = "10/hour"
    for _attempt in range(2):
        _token, key = ApiToken.issue(technologist, "LIS")
        results, one_window = _burst(live_server.url, reverse(path), key)
        if one_window:
            break
    statuses = [status for status, _headers, _body in results]
    if setting == "WBC_API_RATE":
        assert statuses.count(200) == 10 and statuses.count(429) == REQUESTS - 10, statuses
        refused = [(headers, body) for status, headers, body in results if status == 429]
        for headers, body in refused:
            assert 1 <= int(headers["Retry-After"]) <= WINDOW_SECONDS
            assert json.loads(body)["error"]["code"] == "throttled"
    else:
        assert statuses.count(200) == REQUESTS, statuses  # reads count only against the general rate


def test_parallel_classify_requests_pass_exactly_the_submit_rate(
    live_server, technologist, tiny_record, settings, throttle_cache
):
    """The submit rate is counted before the request is read, so refused uploads cost nothing."""
    from tests.conftest import image_bytes

    settings.WBC_API_RATE = "1000/hour"
    settings.WBC_API_SUBMIT_RATE = "5/hour"
    image = image_bytes()
    boundary = "wbc-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cell.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def post(key: str) -> int:
        parts = urlsplit(live_server.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        try:
            headers = {"Authorization": f"Token {key}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
            connection.request("POST", reverse("api:prediction-list"), body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    for _attempt in range(2):
        _token, key = ApiToken.issue(technologist, "LIS")
        start = time.time()
        with ThreadPoolExecutor(max_workers=20) as pool:
            statuses = list(pool.map(post, [key] * 20))
        if int(start // WINDOW_SECONDS) == int(time.time() // WINDOW_SECONDS):
            break
    assert statuses.count(201) == 5 and statuses.count(429) == 15, statuses
