"""Atomic counters for rate limits, in a Django cache.

Django's database cache increments with a read and a separate write, so parallel requests on two threads (or
two gunicorn workers) read the same count and both pass. :class:`AtomicDatabaseCache` does the read and the
write in one transaction that holds the row (``SELECT … FOR UPDATE`` on PostgreSQL; on SQLite the transaction
starts ``IMMEDIATE``, which takes the write lock first). Redis (``RedisCache``) increments atomically itself.

:func:`count_in_window` is the one fixed-window counter every limit uses (API throttles, log-in attempts).
"""

from __future__ import annotations

import base64
import pickle
import time
from dataclasses import dataclass

from django.core.cache import BaseCache
from django.core.cache.backends.db import DatabaseCache
from django.db import connections, router, transaction


class AtomicDatabaseCache(DatabaseCache):
    """The database cache with an ``incr`` that parallel callers cannot interleave."""

    def incr(self, key, delta: int = 1, version=None) -> int:
        db_key = self.make_and_validate_key(key, version=version)
        db = router.db_for_write(self.cache_model_class)
        connection = connections[db]
        quote = connection.ops.quote_name
        table = quote(self._table)
        lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
        with transaction.atomic(using=db), connection.cursor() as cursor:
            cursor.execute(f"SELECT {quote('cache_key')} FROM {table} WHERE {quote('cache_key')} = %s{lock}", [db_key])  # noqa: S608
            if cursor.fetchone() is None:
                raise ValueError(f"Key '{key}' not found")
            value = self.get(key, version=version)  # the row is held: nobody else can change it now
            if value is None:  # expired
                raise ValueError(f"Key '{key}' not found")
            value += delta
            encoded = base64.b64encode(pickle.dumps(value, self.pickle_protocol)).decode("latin1")
            cursor.execute(
                f"UPDATE {table} SET {quote('value')} = %s WHERE {quote('cache_key')} = %s",  # noqa: S608
                [encoded, db_key],
            )
        return value


@dataclass(frozen=True)
class WindowCount:
    count: int  # this request included
    retry_after: float  # seconds until the window ends


def count_in_window(cache: BaseCache, key: str, seconds: int, now: float | None = None) -> WindowCount:
    """Count one more event for ``key`` in the current fixed window of ``seconds`` (atomic in the cache)."""
    now = time.time() if now is None else now
    window = int(now // seconds)
    window_key = f"{key}:{seconds}:{window}"
    # The key outlives its window by a minute, so it cannot expire between the add and the incr; a cache
    # that dropped it anyway (culled) gets one more try.
    for _attempt in range(2):
        cache.add(window_key, 0, timeout=seconds + 60)
        try:
            count = cache.incr(window_key)
            break
        except ValueError:
            continue
    else:
        raise RuntimeError(f"the counter cache keeps losing {window_key!r}")
    return WindowCount(count=count, retry_after=(window + 1) * seconds - now)
