"""Probes for load balancers and orchestrators, without a log-in.

``/healthz`` (liveness): the web process answers; always 200 when it can answer at all.
``/readyz`` (readiness): 200 when the database answers a query, the media storage can write, read back and
delete a tiny probe file, and a background worker has written a heartbeat recently; else 503. Both answer JSON
with the details of each check (no secrets: no paths, no credentials).
"""

from __future__ import annotations

import contextlib
import time
import uuid

from django.contrib.auth.decorators import login_not_required
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from reports.heartbeat import worker_state

PROBE_BYTES = b"wbc readiness probe\n"


@login_not_required
@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _database() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        return {"ok": False, "detail": f"the database did not answer: {type(exc).__name__}"}
    return {"ok": True, "detail": f"{connection.vendor} answers"}


def _storage() -> dict:
    name = f"health/probe-{uuid.uuid4().hex}.txt"
    saved = None
    try:
        saved = default_storage.save(name, ContentFile(PROBE_BYTES))
        with default_storage.open(saved, "rb") as handle:
            same = handle.read() == PROBE_BYTES
    except Exception as exc:  # any backend (file system, S3) may fail in its own way
        return {"ok": False, "detail": f"the media storage failed: {type(exc).__name__}"}
    finally:
        if saved is not None:
            with contextlib.suppress(Exception):  # a probe never raises; a failed write or read is reported
                default_storage.delete(saved)
    if not same:
        return {"ok": False, "detail": "the media storage returned other bytes than were written"}
    return {"ok": True, "detail": "write, read and delete work"}


def _worker() -> dict:
    try:
        state = worker_state()
    except DatabaseError:
        return {"ok": False, "detail": "unknown: the database did not answer"}
    return {"ok": state.alive, "detail": state.message or "a worker is running", **state.as_dict()}


@login_not_required
@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    started = time.perf_counter()
    checks = {"database": _database(), "storage": _storage(), "worker": _worker()}
    ready = all(check["ok"] for check in checks.values())
    body = {
        "status": "ready" if ready else "not ready",
        "checks": checks,
        "took_ms": round((time.perf_counter() - started) * 1000.0, 1),
    }
    return JsonResponse(body, status=200 if ready else 503)
