"""Waking a waiting process the moment something happens, instead of it polling the database.

Two channels: the background worker waits on ``WORKER`` between tasks and is woken when a chunk is
queued; a batch-status long poll waits on ``PROGRESS`` and is woken when a worker has stored a chunk.

One interface, :func:`listen` and :func:`notify`; the transport follows the database:

- PostgreSQL: ``LISTEN``/``NOTIFY``. It reaches every process on every host that uses the database, so a
  worker on another machine needs nothing beyond ``DATABASE_URL``. A waiter holds its own connection
  (psycopg 3, autocommit) while it waits; ``notify`` runs ``pg_notify`` on Django's connection, so inside
  a transaction the message goes out when it commits, never before.
- SQLite (one host): a waiter binds a Unix datagram socket named after its channel in
  ``WBC_WORKER_WAKEUP_DIR``; ``notify`` sends one byte to every socket of the channel.

A lost or spurious wake-up costs nothing: the database stays the truth, and every waiter also looks on its
own after a timeout, so a waiter that missed a message (a database restart, a platform without Unix
sockets) still works, only later.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
import uuid
from pathlib import Path
from typing import Protocol

from django.conf import settings
from django.db import DatabaseError, InterfaceError, connection

logger = logging.getLogger(__name__)
SUPPORTED = hasattr(socket, "AF_UNIX")
WORKER = "worker"  # a chunk was queued
PROGRESS = "progress"  # a batch moved on (a chunk stored, or finished)
PG_CHANNEL_PREFIX = "wbc_"  # PostgreSQL channel names: wbc_worker, wbc_progress


class Waiter(Protocol):
    def wait(self, timeout: float) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> Waiter: ...
    def __exit__(self, *exc) -> None: ...


def _uses_postgresql() -> bool:
    return connection.vendor == "postgresql"


def listen(channel: str = WORKER) -> Waiter:
    """A waiter on ``channel`` for this database. Make it *before* looking at the database: a message sent after
    that is kept for its next ``wait``, never missed."""
    return PostgresWaiter(channel) if _uses_postgresql() else WakeupSocket(channel)


def notify(channel: str) -> int:
    """Wake every waiter on ``channel`` (PostgreSQL: all hosts, sent when the current transaction commits).

    Returns how many local sockets were reached on SQLite; 1 on PostgreSQL when the NOTIFY was sent, 0 when the
    database could not be reached (nobody is woken then; the waiters look on their own anyway).
    """
    if not _uses_postgresql():
        return notify_sockets(channel)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [PG_CHANNEL_PREFIX + channel])
    except (DatabaseError, InterfaceError) as exc:
        logger.debug("could not notify %s: %s", channel, exc)
        return 0
    return 1


class PostgresWaiter:
    """``LISTEN`` on a connection of its own; ``wait(timeout)`` returns early when a ``NOTIFY`` arrives.

    A broken connection (the database restarted) is dropped and opened again on the next wait; until then the
    waiter just sleeps its timeout, so the caller falls back to looking on its own.
    """

    def __init__(self, channel: str = WORKER) -> None:
        self.channel = PG_CHANNEL_PREFIX + channel
        self.conn = None
        self._connect()

    def _connect(self) -> None:
        import psycopg
        from psycopg import sql

        try:
            params = {"connect_timeout": 5, **connection.get_connection_params(), "autocommit": True}
            conn = psycopg.connect(**params)
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except psycopg.Error as exc:
            logger.warning("LISTEN %s unavailable (%s); polling until it is back", self.channel, exc)
            return
        self.conn = conn

    def wait(self, timeout: float) -> bool:
        """Sleep until notified or ``timeout`` seconds pass; True when notified. Queued notifications are drained."""
        import psycopg

        if self.conn is None:
            started = time.monotonic()
            self._connect()
            if self.conn is None:
                time.sleep(max(0.0, timeout - (time.monotonic() - started)))
                return False
        try:
            woken = any(True for _ in self.conn.notifies(timeout=timeout, stop_after=1))
            if woken:
                for _ in self.conn.notifies(timeout=0):
                    pass
        except psycopg.Error as exc:
            logger.warning("LISTEN %s lost (%s); reconnecting", self.channel, exc)
            self.close()
            return False
        return woken

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def __enter__(self) -> PostgresWaiter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _directory() -> Path:
    return Path(settings.WBC_WORKER_WAKEUP_DIR)


class WakeupSocket:
    """The one-host transport (SQLite): ``wait(timeout)`` returns early when someone calls :func:`notify_sockets`
    on its channel.
    """

    def __init__(self, channel: str = WORKER) -> None:
        self.path: Path | None = None
        self.sock: socket.socket | None = None
        if not SUPPORTED:
            return
        directory = _directory()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{channel}-{uuid.uuid4().hex[:12]}.sock"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(path))
            sock.setblocking(False)
        except OSError as exc:  # e.g. a read-only folder or a path too long: polling still works
            logger.warning("wake-up socket unavailable (%s); polling only", exc)
            return
        self.path, self.sock = path, sock

    def wait(self, timeout: float) -> bool:
        """Sleep until woken or ``timeout`` seconds pass; True when woken. Queued wake-ups are drained."""
        if self.sock is None:
            select.select([], [], [], timeout)
            return False
        ready, _, _ = select.select([self.sock], [], [], timeout)
        woken = bool(ready)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.sock.recv(16)
        return woken

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.path.unlink(missing_ok=True)
            self.sock = None

    def __enter__(self) -> WakeupSocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def notify_sockets(channel: str) -> int:
    """Wake every local socket waiter on ``channel``; returns how many were reached."""
    if not SUPPORTED:
        return 0
    try:
        paths = list(_directory().glob(f"{channel}-*.sock"))
    except OSError:
        return 0
    if not paths:
        return 0
    reached = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for path in paths:
            try:
                sock.sendto(b"!", str(path))
                reached += 1
            except BlockingIOError:  # its queue is full: it has wake-ups waiting already
                reached += 1
            except (ConnectionRefusedError, FileNotFoundError):  # the waiter is gone
                with contextlib.suppress(OSError):
                    path.unlink()
            except OSError as exc:
                logger.debug("could not wake %s: %s", path, exc)
    return reached
