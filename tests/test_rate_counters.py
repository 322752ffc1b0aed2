"""The rate counters in the database cache (accounts.counter_cache): one short transaction per counted request, values
readable like any cached value, expired windows restarted and deleted. (Exactly the allowed number of parallel
requests passing is tests/test_throttle_concurrency.py.)"""

from __future__ import annotations

import time

import pytest
from django.conf import settings
from django.core.cache import caches
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts import counter_cache
from accounts.authentication import THROTTLE_CACHE
from accounts.counter_cache import AtomicDatabaseCache, count_in_window

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def counters():
    cache = caches[THROTTLE_CACHE]
    assert isinstance(cache, AtomicDatabaseCache)  # the default: no REDIS_URL in the tests
    cache.clear()  # the cache table is not a model: transactional tests do not empty it
    yield cache
    cache.clear()


def _rows() -> int:
    table = connection.ops.quote_name(settings.CACHES[THROTTLE_CACHE]["LOCATION"])
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {table}")
        return cursor.fetchone()[0]


def test_counts_one_by_one_and_the_value_reads_back_through_the_cache(counters):
    now = time.time()
    counts = [count_in_window(counters, "throttle_api_token-1", 60, now) for _ in range(3)]
    assert [c.count for c in counts] == [1, 2, 3]
    assert 0 < counts[-1].retry_after <= 60
    assert counters.get(f"throttle_api_token-1:60:{int(now // 60)}") == 3
    assert count_in_window(counters, "throttle_api_token-2", 60, now).count == 1  # another key: its own count
    assert counters.incr(f"throttle_api_token-1:60:{int(now // 60)}") == 4  # incr still works on the same rows


def test_a_request_is_counted_in_one_transaction_without_counting_the_table(counters):
    count_in_window(counters, "throttle_api_token-1", 60)  # the window's counter exists from here on
    with CaptureQueriesContext(connection) as queries:
        assert count_in_window(counters, "throttle_api_token-1", 60).count == 2
    statements = [q["sql"].split()[0].upper() for q in queries]
    assert statements.count("SELECT") == 1 and statements.count("UPDATE") == 1, statements
    assert not any("COUNT(" in q["sql"].upper() for q in queries)  # Django's add counts every row for culling
    assert "INSERT" not in statements  # nor an INSERT that fails on an existing key


def test_an_expired_counter_starts_again_and_expired_rows_are_deleted(counters, monkeypatch):
    monkeypatch.setattr(counter_cache, "CULL_SECONDS", 0)  # whatever other tests of this process culled
    counters.set("left-by-an-old-window", 7, timeout=-1)  # already expired
    counters.set("still-live", 1, timeout=3600)
    assert count_in_window(counters, "throttle_api_token-1", 60).count == 1
    assert counters.get("still-live") == 1 and _rows() == 2  # the new counter and the live value
    key = "throttle_api_token-1:60:expired"
    counters.set(key, 41, timeout=-1)
    assert counters.count(key, 60) == 1  # not 42: an expired counter is not continued
    assert counters.count(key, 60) == 2


def test_expired_counters_are_deleted_at_most_once_a_minute_per_process(counters, monkeypatch):
    monkeypatch.setattr(counter_cache, "_last_cull", {})
    counters.set("left-by-an-old-window", 7, timeout=-1)
    with CaptureQueriesContext(connection) as first:
        assert count_in_window(counters, "throttle_api_token-1", 60).count == 1
    counters.set("left-by-another-window", 7, timeout=-1)
    with CaptureQueriesContext(connection) as second:
        assert count_in_window(counters, "throttle_api-submit_token-1", 60).count == 1

    def culls(queries) -> int:  # a DELETE of every expired row, not only of the counter's own key
        return sum(q["sql"].upper().startswith("DELETE") and "CACHE_KEY" not in q["sql"].upper() for q in queries)

    assert culls(first) == 1 and culls(second) == 0
    assert _rows() == 3  # the two new counters, and the expired row left for the next cull
