"""With REDIS_URL set, both caches are Redis through Django's own RedisCache, so the API rate counters are shared by
every process and host: requests from two processes count against one limit, and the one over it gets a 429.

Against the real Redis on 127.0.0.1:6379 (a missing Redis fails in CI, see tests.conftest.unavailable), under a key
prefix of this test's own, removed afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import redis
from django.core.cache import caches
from django.test import Client
from django.urls import reverse

from accounts.models import ApiToken
from tests.conftest import REPO, test_database_url, unavailable
from wbcsite.settings import caches_config

pytestmark = pytest.mark.django_db(transaction=True)

REDIS_URL = os.environ.get("WBC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RATE, LIMIT, WINDOW_S = "5/hour", 5, 3600
REDIS_BACKEND = "django.core.cache.backends.redis.RedisCache"

# The other "host": a separate process with its own settings and Redis connection, making API requests on the token.
OTHER_HOST = """
import json, sys
import django
django.setup()
from django.test import Client
from django.core.cache import cache
key, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = Client(HTTP_HOST="localhost", HTTP_AUTHORIZATION=f"Token {key}")
print(json.dumps({"statuses": [client.get(path).status_code for _ in range(count)], "probe": cache.get("probe")}))
"""


@pytest.fixture
def redis_env(settings, monkeypatch):
    """This process configured as a host with REDIS_URL (and a key prefix of its own); its keys are removed after."""
    connection = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        connection.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    prefix = f"wbc-test-{uuid.uuid4().hex[:12]}"
    env = {"REDIS_URL": REDIS_URL, "WBC_REDIS_KEY_PREFIX": prefix, "WBC_API_RATE": RATE}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings.CACHES = caches_config()
    settings.WBC_API_RATE = RATE
    yield env
    for key in connection.scan_iter(match=f"{prefix}*", count=1000):
        connection.delete(key)
    connection.close()


def test_with_redis_url_both_caches_are_djangos_redis_cache(redis_env, settings):
    assert {settings.CACHES[name]["BACKEND"] for name in ("default", "api_throttle")} == {REDIS_BACKEND}
    assert {settings.CACHES[name]["LOCATION"] for name in ("default", "api_throttle")} == {REDIS_URL}
    prefix = redis_env["WBC_REDIS_KEY_PREFIX"]
    assert (settings.CACHES["default"]["KEY_PREFIX"], settings.CACHES["api_throttle"]["KEY_PREFIX"]) == (
        prefix,
        f"{prefix}-rate",
    )


def _host_env(redis_env: dict, settings) -> dict:
    return {
        **os.environ,
        **redis_env,
        "DJANGO_SETTINGS_MODULE": "wbcsite.settings",
        "DATABASE_URL": test_database_url(),
        "SECRET_KEY": settings.SECRET_KEY,  # token digests depend on it: the same on every host
    }


def _requests_from_another_process(key: str, count: int, env: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", OTHER_HOST, key, reverse("api:me"), str(count)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_processes_share_the_rate_counters_and_the_cache_and_the_request_over_the_rate_is_429(
    redis_env, technologist, settings
):
    env = _host_env(redis_env, settings)
    for _attempt in range(2):  # a run that straddles two rate windows (hours) is tried once more
        start = time.time()
        _token, key = ApiToken.issue(technologist, "LIS")
        here = Client(HTTP_AUTHORIZATION=f"Token {key}")
        first = [here.get(reverse("api:me")).status_code for _ in range(3)]
        caches["default"].set("probe", f"written by the first process for {key[-6:]}", timeout=300)
        there = _requests_from_another_process(key, 3, env)  # requests 4, 5 and 6 of the window
        last = here.get(reverse("api:me"))
        if int(start // WINDOW_S) == int(time.time() // WINDOW_S):
            break
    assert first == [200, 200, 200]
    assert there["statuses"] == [200, 200, 429]  # the other process counted this one's three requests
    assert there["probe"] == f"written by the first process for {key[-6:]}"  # and reads its default cache
    assert last.status_code == 429 and 1 <= int(last["Retry-After"]) <= WINDOW_S
    assert last.json()["error"]["code"] == "throttled"
    counters = list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"{redis_env['WBC_REDIS_KEY_PREFIX']}-rate:*"))
    assert counters, "the rate counters are not in Redis under this installation's prefix"
