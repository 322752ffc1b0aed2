"""The background delivery of the outbox. ``deliver_due`` is what the worker calls (run_worker's loop, a django.tasks
task, or ``manage.py deliver_lis``).

A destination's messages go out strictly in order: only its oldest undelivered message is tried, and the next one
waits until it is delivered or refused. A message is claimed with a lease (a compare-and-set on the row, as the
batch worker does), so two workers never send it at once, and a worker killed mid-send leaves a lease that runs
out: the message is then sent again. The receiver may see a control id twice; nothing is ever lost.

Outcomes: HL7 AA (FHIR 2xx) delivered; AE/AR (FHIR 4xx) failed, with the receiver's text, until a person resends
it; no acknowledgement (timeout, refused or dropped connection, FHIR 5xx/408/429) retried with exponential back-off
and jitter, for as long as it takes. Every attempt is recorded.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import requests
from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone

from . import mllp
from .models import DeliveryAttempt, Destination, OutboxMessage
from .tokens import TokenUnavailable, bearer_token

log = logging.getLogger(__name__)
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def _setting(name: str, default: float) -> float:
    return float(getattr(settings, name, os.environ.get(name, default)))


def retry_base_s() -> float:
    return _setting("WBC_LIS_RETRY_BASE_SECONDS", 5.0)


def retry_cap_s() -> float:
    return _setting("WBC_LIS_RETRY_MAX_SECONDS", 600.0)


def lease_seconds(destination: Destination) -> float:
    """Longer than one whole send (connect, write, wait for the ACK), so a live worker never loses its lease."""
    return 3 * destination.timeout_s + _setting("WBC_LIS_LEASE_MARGIN_SECONDS", 30.0)


def backoff(attempts: int) -> timedelta:
    """Exponential back-off with jitter: base × 2^(n−1), capped, times a random factor in [0.5, 1]."""
    delay = min(retry_cap_s(), retry_base_s() * 2 ** max(attempts - 1, 0))
    return timedelta(seconds=delay * random.uniform(0.5, 1.0))


@dataclass(frozen=True)
class Outcome:
    kind: str  # DeliveryAttempt.Outcome
    code: str = ""
    detail: str = ""


def _send_hl7(message: OutboxMessage, destination: Destination) -> Outcome:
    try:
        ack = mllp.send(
            destination.host,
            destination.port,
            message.payload,
            timeout=destination.timeout_s,
            use_tls=destination.use_tls,
        )
    except mllp.TransportError as exc:
        return Outcome(DeliveryAttempt.Outcome.RETRY, detail=str(exc))
    if ack.control_id != message.control_id:
        return Outcome(
            DeliveryAttempt.Outcome.RETRY,
            ack.code,
            f"The acknowledgement is for control id {ack.control_id!r}, not {message.control_id!r}.",
        )
    if ack.accepted:
        return Outcome(DeliveryAttempt.Outcome.ACCEPTED, ack.code, ack.text)
    if ack.code in mllp.REFUSED:
        return Outcome(DeliveryAttempt.Outcome.REJECTED, ack.code, ack.text or f"The receiver answered {ack.code}.")
    return Outcome(DeliveryAttempt.Outcome.RETRY, ack.code, f"Unknown acknowledgement code {ack.code!r}.")


def _operation_outcome_text(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    issues = body.get("issue") or [] if isinstance(body, dict) else []
    texts = [i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code", "") for i in issues]
    return "; ".join(t for t in texts if t)[:500] or response.text[:500]


def _send_fhir(message: OutboxMessage, destination: Destination) -> Outcome:
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    try:
        token = bearer_token(destination)
    except TokenUnavailable as exc:
        return Outcome(DeliveryAttempt.Outcome.RETRY, detail=str(exc))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = requests.post(
            destination.base_url.rstrip("/"),
            data=message.payload.encode(),
            headers=headers,
            timeout=destination.timeout_s,
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        return Outcome(DeliveryAttempt.Outcome.RETRY, detail=f"{type(exc).__name__}: {exc}"[:500])
    code = str(response.status_code)
    if 200 <= response.status_code < 300:
        return Outcome(DeliveryAttempt.Outcome.ACCEPTED, code)
    if response.status_code >= 500 or response.status_code in (408, 429):
        return Outcome(DeliveryAttempt.Outcome.RETRY, code, _operation_outcome_text(response))
    return Outcome(DeliveryAttempt.Outcome.REJECTED, code, _operation_outcome_text(response))


def _claim(message: OutboxMessage, now: datetime, destination: Destination) -> uuid.UUID | None:
    lease = uuid.uuid4()
    claimed = (
        OutboxMessage.objects.filter(pk=message.pk, status=OutboxMessage.Status.PENDING, next_attempt_at__lte=now)
        .filter(Q(lease__isnull=True) | Q(lease_until__lte=now))
        .update(
            lease=lease, lease_until=now + timedelta(seconds=lease_seconds(destination)), attempts=F("attempts") + 1
        )
    )
    return lease if claimed else None


def send_message(message: OutboxMessage, lease: uuid.UUID) -> Outcome:
    """Send one claimed message, record the attempt, and settle the row (only while we still hold its lease)."""
    destination = message.destination
    attempt = DeliveryAttempt.objects.create(message=message, started_at=timezone.now(), worker=WORKER_ID)
    sender = _send_hl7 if message.format == OutboxMessage.Format.HL7 else _send_fhir
    try:
        outcome = sender(message, destination)
    except Exception as exc:  # a bug must not lose the message: it is retried, and the error is shown
        log.exception("LIS delivery of %s failed unexpectedly", message.control_id)
        outcome = Outcome(DeliveryAttempt.Outcome.RETRY, detail=f"{type(exc).__name__}: {exc}"[:500])
    finished = timezone.now()
    DeliveryAttempt.objects.filter(pk=attempt.pk).update(
        finished_at=finished, outcome=outcome.kind, ack_code=outcome.code[:10], detail=outcome.detail
    )
    mine = OutboxMessage.objects.filter(pk=message.pk, lease=lease)
    release = {"lease": None, "lease_until": None}
    if outcome.kind == DeliveryAttempt.Outcome.ACCEPTED:
        mine.update(status=OutboxMessage.Status.DELIVERED, delivered_at=finished, last_error="", **release)
    elif outcome.kind == DeliveryAttempt.Outcome.REJECTED:
        mine.update(status=OutboxMessage.Status.FAILED, last_error=outcome.detail, **release)
    else:
        attempts = OutboxMessage.objects.filter(pk=message.pk).values_list("attempts", flat=True).first() or 1
        mine.update(next_attempt_at=finished + backoff(attempts), last_error=outcome.detail, **release)
    return outcome


def deliver_due(now: datetime | None = None, *, limit: int = 100) -> int:
    """Send what is due, each destination's messages in order; returns the number of attempts made."""
    attempts = 0
    for destination in Destination.objects.filter(messages__status=OutboxMessage.Status.PENDING).distinct():
        while attempts < limit:
            moment = now or timezone.now()
            head = destination.messages.filter(status=OutboxMessage.Status.PENDING).order_by("id").first()
            if head is None or head.next_attempt_at > moment:
                break  # nothing left, or the head waits for its retry: the later ones wait behind it
            lease = _claim(head, moment, destination)
            if lease is None:
                break  # another worker holds it
            head.destination = destination
            attempts += 1
            if send_message(head, lease).kind != DeliveryAttempt.Outcome.ACCEPTED:
                break
    return attempts


def next_due_in(now: datetime | None = None) -> float | None:
    """Seconds until the earliest pending message is due (None: nothing pending); for the worker's sleep."""
    now = now or timezone.now()
    earliest = (
        OutboxMessage.objects.filter(status=OutboxMessage.Status.PENDING)
        .order_by("next_attempt_at")
        .values_list("next_attempt_at", flat=True)
        .first()
    )
    return None if earliest is None else max((earliest - now).total_seconds(), 0.0)


class ResendRefused(ValueError):
    """A message that must not be sent again (a later version of the report exists)."""


def resend(message: OutboxMessage) -> None:
    """A person asks to send it again (after a refusal, or to repeat a delivered one): it goes to the head of its
    destination's queue. A superseded version is refused: resending it would undo the correction at the LIS. So is
    an AI-only (preliminary) result once a signed version was sent to the destination."""
    newer = OutboxMessage.objects.filter(destination_id=message.destination_id, batch_id=message.batch_id)
    if message.report_version is None:
        newer = newer.filter(report_version__isnull=False)
    else:
        newer = newer.filter(report_version__number__gt=message.report_version.number)
    if newer.exists():
        raise ResendRefused("A later version of this report was sent to this destination; resend that one instead.")
    now = timezone.now()
    OutboxMessage.objects.filter(pk=message.pk).filter(Q(lease__isnull=True) | Q(lease_until__lte=now)).update(
        status=OutboxMessage.Status.PENDING, next_attempt_at=now, lease=None, lease_until=None
    )
