"""Waking the background worker the moment a batch is queued, instead of it polling the database.

Each worker binds a Unix datagram socket in ``WBC_WORKER_WAKEUP_DIR`` and, between tasks, waits on it
(up to ``idle_seconds``, after which it looks at the queue anyway). Whoever enqueues a task sends one byte
to every socket there. A lost or spurious wake-up costs nothing: the queue in the database stays the
truth, and the timeout keeps a worker that missed a message (or runs where Unix sockets do not exist)
working, only later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
from pathlib import Path

from django.conf import settings

logger = logging.getLogger(__name__)
SUPPORTED = hasattr(socket, "AF_UNIX")


def _directory() -> Path:
    return Path(settings.WBC_WORKER_WAKEUP_DIR)


class WakeupSocket:
    """The worker's end: ``wait(timeout)`` returns early when someone calls :func:`notify_workers`."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.sock: socket.socket | None = None
        if not SUPPORTED:
            return
        directory = _directory()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"worker-{os.getpid()}.sock"
            path.unlink(missing_ok=True)  # left by an earlier process with this pid
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(path))
            sock.setblocking(False)
        except OSError as exc:  # e.g. a read-only folder or a path too long: polling still works
            logger.warning("worker wake-up socket unavailable (%s); polling the queue only", exc)
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


def notify_workers() -> int:
    """Wake every worker listening in the wake-up folder; returns how many were reached."""
    if not SUPPORTED:
        return 0
    try:
        paths = list(_directory().glob("worker-*.sock"))
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
            except (ConnectionRefusedError, FileNotFoundError):  # the worker is gone
                with contextlib.suppress(OSError):
                    path.unlink()
            except OSError as exc:
                logger.debug("could not wake %s: %s", path, exc)
    return reached
