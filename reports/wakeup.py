"""Waking a waiting process the moment something happens, instead of it polling the database.

Two channels: the background worker waits on ``WORKER`` between tasks and is woken when a batch is
queued; a batch-status long poll waits on ``PROGRESS`` and is woken when the worker has stored a chunk.
A waiter binds a Unix datagram socket named after its channel in ``WBC_WORKER_WAKEUP_DIR``; ``notify``
sends one byte to every socket of the channel. A lost or spurious wake-up costs nothing: the database
stays the truth, and every waiter also looks on its own after a timeout, so a waiter that missed a
message (or a worker on another machine, or a platform without Unix sockets) still works, only later.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import uuid
from pathlib import Path

from django.conf import settings

logger = logging.getLogger(__name__)
SUPPORTED = hasattr(socket, "AF_UNIX")
WORKER = "worker"  # a batch was queued
PROGRESS = "progress"  # a batch moved on (a chunk stored, or finished)


def _directory() -> Path:
    return Path(settings.WBC_WORKER_WAKEUP_DIR)


class WakeupSocket:
    """A waiter's end: ``wait(timeout)`` returns early when someone calls :func:`notify` on its channel.

    Bind it *before* looking at the database: a message sent after that is queued, never missed.
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


def notify(channel: str) -> int:
    """Wake every waiter on ``channel``; returns how many were reached."""
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
