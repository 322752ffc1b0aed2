"""Atomic counters for rate limits, in a Django cache.

Django's database cache increments with a read and a separate write, so parallel requests on two threads (or
two gunicorn workers) read the same count and both pass. :class:`AtomicDatabaseCache` does the read and the
write in one transaction that holds the row (``SELECT … FOR UPDATE`` on PostgreSQL; on SQLite the transaction
starts ``IMMEDIATE``, which takes the write lock first). Redis (``RedisCache``) increments atomically itself.

:func:`count_in_window` is the one fixed-window counter every limit uses (API throttles, log-in attempts). On the
database it is one short transaction per request (:meth:`AtomicDatabaseCache.count`), not Django's ``add`` (which
counts the whole table for culling and fails an INSERT on every request but the first) followed by ``incr``.
"""

from __future__ import annotations

import base64
import math
import pickle
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from django.core.cache import BaseCache
from django.core.cache.backends.db import DatabaseCache
from django.db import DatabaseError, IntegrityError, connections, router, transaction

# Expired counters are deleted at most once a minute per process and table: every key starts a new window each minute,
# so culling whenever a counter starts cost a transaction on most requests of a quiet client (and 2 of a submission).
CULL_SECONDS = 60
_last_cull: dict[str, float] = {}
_cull_lock = threading.Lock()


def _cull_due(table: str) -> bool:
    """Whether this process should delete the table's expired counters now (then it is not due for a while)."""
    now = time.monotonic()
    with _cull_lock:
        if now - _last_cull.get(table, -math.inf) < CULL_SECONDS:
            return False
        _last_cull[table] = now
        return True


class AtomicDatabaseCache(DatabaseCache):
    """The database cache with an ``incr`` (and a :meth:`count`) that parallel callers cannot interleave."""

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
            cursor.execute(
                f"UPDATE {table} SET {quote('value')} = %s WHERE {quote('cache_key')} = %s",  # noqa: S608
                [self._encoded(value), db_key],
            )
        return value

    def count(self, key, timeout: int, version=None) -> int:
        """One more for the counter ``key``, in one transaction: 1 (kept ``timeout`` seconds) when it is missing or
        expired, else its value plus one. Returns the new value; :meth:`get` reads it like any cached value.

        When a counter starts, expired ones are deleted (Django's cache culls only above MAX_ENTRIES, which for
        counters kept far away means a table that only grows), at most every ``CULL_SECONDS`` per process, in a
        separate step that may fail harmlessly.
        """
        db_key = self.make_and_validate_key(key, version=version)
        db = router.db_for_write(self.cache_model_class)
        connection = connections[db]
        quote = connection.ops.quote_name
        table, key_column, value_column = quote(self._table), quote("cache_key"), quote("value")
        expires_column = quote("expires")
        now = datetime.now(UTC).replace(microsecond=0)
        expires = datetime.fromtimestamp(self.get_backend_timeout(timeout), tz=UTC).replace(microsecond=0)
        now_db, expires_db = (connection.ops.adapt_datetimefield_value(moment) for moment in (now, expires))
        lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
        for _attempt in range(3):  # PostgreSQL: a parallel request may insert the same new counter first
            try:
                with transaction.atomic(using=db), connection.cursor() as cursor:
                    cursor.execute(
                        f"SELECT {value_column} FROM {table} WHERE {key_column} = %s AND {expires_column} >= %s{lock}",  # noqa: S608
                        [db_key, now_db],
                    )
                    row = cursor.fetchone()
                    if row is not None:
                        value = pickle.loads(base64.b64decode(row[0].encode())) + 1  # noqa: S301 (our own rows)
                        cursor.execute(
                            f"UPDATE {table} SET {value_column} = %s WHERE {key_column} = %s",  # noqa: S608
                            [self._encoded(value), db_key],
                        )
                        return value
                    cursor.execute(  # an expired counter of this key; a live one inserted meanwhile stays
                        f"DELETE FROM {table} WHERE {key_column} = %s AND {expires_column} < %s",  # noqa: S608
                        [db_key, now_db],
                    )
                    cursor.execute(
                        f"INSERT INTO {table} ({key_column}, {value_column}, {expires_column}) VALUES (%s, %s, %s)",  # noqa: S608
                        [db_key, self._encoded(1), expires_db],
                    )
                break
            except IntegrityError:
                continue
        else:
            raise RuntimeError(f"the counter {key!r} could not be started")
        if not _cull_due(self._table):
            return 1
        try:
            with transaction.atomic(using=db), connection.cursor() as cursor:
                cursor.execute(f"DELETE FROM {table} WHERE {expires_column} < %s", [now_db])  # noqa: S608
        except DatabaseError:  # e.g. two culls deadlocked on PostgreSQL: the next counter to start culls again
            pass
        return 1

    def _encoded(self, value: int) -> str:
        """A value as DatabaseCache stores it: base64 of its pickle."""
        return base64.b64encode(pickle.dumps(value, self.pickle_protocol)).decode("latin1")


@dataclass(frozen=True)
class WindowCount:
    count: int  # this request included
    retry_after: float  # seconds until the window ends


def count_in_window(cache: BaseCache, key: str, seconds: int, now: float | None = None) -> WindowCount:
    """Count one more event for ``key`` in the current fixed window of ``seconds`` (atomic in the cache)."""
    now = time.time() if now is None else now
    window = int(now // seconds)
    window_key = f"{key}:{seconds}:{window}"
    # The key outlives its window by a minute, so it cannot expire between the add and the incr.
    if isinstance(cache, AtomicDatabaseCache):
        count = cache.count(window_key, seconds + 60)
    else:
        count = _add_then_incr(cache, window_key, seconds + 60)
    return WindowCount(count=count, retry_after=(window + 1) * seconds - now)


def _add_then_incr(cache: BaseCache, key: str, timeout: int) -> int:
    """Redis (and any other cache): ``add`` then an atomic ``incr``; a key dropped anyway (culled) gets one more try."""
    for _attempt in range(2):
        cache.add(key, 0, timeout=timeout)
        try:
            return cache.incr(key)
        except ValueError:
            continue
    raise RuntimeError(f"the counter cache keeps losing {key!r}")
