"""LIS delivery: a real MLLP listener (asyncio, python-hl7 streams) on 127.0.0.1 that ACKs AA, answers AE, drops
the connection, answers too late, is down for a while and comes back; a worker killed mid-send; a local HTTP
server playing the FHIR endpoint; the delivery pages and the manual resend."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import hl7
import pytest
from django.urls import reverse
from hl7.mllp import start_hl7_server

from lis import tokens
from lis.delivery import deliver_due
from lis.fhir import parse_bundle
from lis.models import DeliveryAttempt, Destination, OutboxMessage
from tests.conftest import test_database_url
from tests.test_lis_messages import make_slide, named_user, sign_and_send

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db(transaction=True)


class Listener:
    """An MLLP listener on 127.0.0.1 in its own thread. ``script`` says what to do with each message received, in
    turn ("AA", "AE", "drop", "late", "hang"); after the script it ACKs AA. Every message is recorded."""

    def __init__(self, script=(), late_s: float = 1.5):
        self.script = list(script)
        self.late_s = late_s
        self.received: list[str] = []  # control ids, in arrival order
        self.acked: list[str] = []  # control ids answered AA
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.port = 0
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.start()

    async def _handle(self, reader, writer):
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                control_id = str(message.segment("MSH")[10])
                self.received.append(control_id)
                action = self.script.pop(0) if self.script else "AA"
                if action == "drop":
                    break
                if action == "hang":
                    await asyncio.sleep(3600)
                if action == "late":
                    await asyncio.sleep(self.late_s)
                code = "AE" if action == "AE" else "AA"
                ack = message.create_ack(ack_code=code, application="LIS", facility="HOSP")
                if code == "AE":
                    ack = hl7.parse(
                        str(ack).rstrip("\r") + "\rERR|||207^Application internal error^HL70357|E||||Unknown test code"
                    )
                if code == "AA" and action != "late":  # a late ACK finds the sender gone: it does not count
                    self.acked.append(control_id)  # before the ACK leaves, so the sender never sees it first
                writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def start(self) -> None:
        async def serve():
            return await start_hl7_server(self._handle, "127.0.0.1", self.port or 0, encoding="utf-8")

        self.server = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close():
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)

    def shutdown(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def listener_factory():
    made = []

    def make(*args, **kwargs) -> Listener:
        listener = Listener(*args, **kwargs)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        try:
            listener.shutdown()
        except (RuntimeError, OSError):
            pass


@pytest.fixture
def fast_retries(settings):
    settings.WBC_LIS_RETRY_BASE_SECONDS = 0.05
    settings.WBC_LIS_RETRY_MAX_SECONDS = 0.2
    settings.WBC_LIS_LEASE_MARGIN_SECONDS = 0.0


@pytest.fixture
def signer(lab_a):
    return named_user("asmith", lab_a, "Technologist")


def deliver_until(predicate, deadline_s: float = 20.0) -> int:
    """Run the delivery rounds (as the worker does) until ``predicate()`` or the deadline; returns the rounds."""
    deadline = time.monotonic() + deadline_s
    rounds = 0
    while not predicate():
        assert time.monotonic() < deadline, "delivery did not finish in time"
        deliver_due()
        rounds += 1
        time.sleep(0.02)
    return rounds


def signed_slides(user, record, count: int) -> list:
    return [
        sign_and_send(user, make_slide(user, record, name=f"Slide {i}", accession=f"ACC-{i}")) for i in range(count)
    ]


def test_every_slide_arrives_in_order_through_refusals_drops_timeouts_and_an_outage(
    lab_a, signer, tiny_record, listener_factory, fast_retries
):
    listener = listener_factory(script=["AA", "AE", "drop", "late"], late_s=2.5)
    destination = Destination.objects.create(
        laboratory=lab_a, name="LIS", kind="mllp", host="127.0.0.1", port=listener.port, timeout_s=1.0
    )
    versions = signed_slides(signer, tiny_record, 5)
    ids = list(
        OutboxMessage.objects.filter(destination=destination).order_by("id").values_list("control_id", flat=True)
    )
    assert ids == [f"WBC{v.pk}V1" for v in versions]

    # 1st: AA. 2nd: AE -> failed with the receiver's text, and the queue moves on.
    deliver_until(lambda: OutboxMessage.objects.filter(status="failed").exists())
    refused = OutboxMessage.objects.get(status="failed")
    assert refused.control_id == ids[1] and "Unknown test code" in refused.last_error
    assert refused.attempts_log.get().ack_code == "AE"
    # 3rd is dropped, then answered too late: both retried; then the listener is down for a while
    outage = OutboxMessage.objects.get(control_id=ids[2])
    deliver_until(lambda: OutboxMessage.objects.get(pk=outage.pk).attempts >= 2)
    listener.stop()
    deliver_until(lambda: OutboxMessage.objects.get(pk=outage.pk).attempts >= 4)  # connection refused, retried
    assert OutboxMessage.objects.get(pk=outage.pk).status == "pending"
    assert not OutboxMessage.objects.filter(control_id__in=ids[3:], attempts__gt=0).exists()  # nothing overtook it
    listener.start()  # back, on the same port
    deliver_until(lambda: OutboxMessage.objects.filter(status="delivered").count() == 4)

    assert listener.acked == [ids[0], ids[2], ids[3], ids[4]]  # in order, each exactly once per ACK
    assert list(dict.fromkeys(listener.received)) == ids  # first arrivals in signing order
    outcomes = list(OutboxMessage.objects.get(pk=outage.pk).attempts_log.values_list("outcome", flat=True))
    assert outcomes[-1] == "accepted" and set(outcomes[:-1]) == {"retry"} and len(outcomes) >= 4
    details = " ".join(OutboxMessage.objects.get(pk=outage.pk).attempts_log.values_list("detail", flat=True))
    assert "closed before an acknowledgement" in details and "No acknowledgement within" in details
    assert "Connection failed" in details

    # a person resends the refused one after fixing the LIS: it goes through
    from lis.delivery import resend

    resend(refused)
    deliver_until(lambda: OutboxMessage.objects.get(pk=refused.pk).status == "delivered")
    assert listener.acked[-1] == ids[1]
    assert DeliveryAttempt.objects.filter(message=refused).count() == 2


def test_backoff_grows_with_jitter(settings):
    from lis.delivery import backoff

    settings.WBC_LIS_RETRY_BASE_SECONDS = 2
    settings.WBC_LIS_RETRY_MAX_SECONDS = 60
    delays = {n: [backoff(n).total_seconds() for _ in range(50)] for n in (1, 3, 10)}
    assert all(1.0 <= d <= 2.0 for d in delays[1]) and all(4.0 <= d <= 8.0 for d in delays[3])
    assert all(30.0 <= d <= 60.0 for d in delays[10])  # capped
    assert len(set(delays[3])) > 10  # jitter: retries of many messages do not all land at once


def _worker(env_extra: dict) -> subprocess.Popen:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "wbcsite.settings",
        "DATABASE_URL": test_database_url(),
        "WBC_LIS_RETRY_BASE_SECONDS": "0.05",
        "WBC_LIS_RETRY_MAX_SECONDS": "0.2",
        "WBC_LIS_LEASE_MARGIN_SECONDS": "0",
        **env_extra,
    }
    command = [sys.executable, "manage.py", "deliver_lis", "--idle", "0.1"]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_worker_killed_mid_send_loses_nothing(lab_a, signer, tiny_record, listener_factory):
    listener = listener_factory(script=["hang"])  # receives the first message and never answers
    Destination.objects.create(
        laboratory=lab_a, name="LIS", kind="mllp", host="127.0.0.1", port=listener.port, timeout_s=5.0
    )
    versions = signed_slides(signer, tiny_record, 3)
    ids = [f"WBC{v.pk}V1" for v in versions]
    worker = _worker({})
    try:
        deadline = time.monotonic() + 60
        while not listener.received:
            assert time.monotonic() < deadline and worker.poll() is None, worker.stdout.read() if worker.poll() else ""
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGKILL)  # killed while waiting for the ACK of the first message
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
    first = OutboxMessage.objects.get(control_id=ids[0])
    assert first.status == "pending" and first.lease is not None  # claimed, never settled
    assert first.attempts_log.get().finished_at is None  # the interrupted attempt is on record

    # restart at once: the dead worker's lease (3 × the 5 s timeout) still holds, so nothing is sent twice
    # at the same time; once it runs out the message is sent again and everything behind it follows, in order
    assert deliver_due() == 0
    worker = _worker({})
    try:
        deadline = time.monotonic() + 60
        while OutboxMessage.objects.filter(status="delivered").count() < 3:
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.1)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(10)
    assert listener.received == [ids[0], ids[0], ids[1], ids[2]]  # the receiver saw the first twice: none lost
    assert listener.acked == ids


class FhirHandler(BaseHTTPRequestHandler):
    """A FHIR server stand-in: records each transaction; the first answer is a 503 (retried), then 200."""

    received: list[dict] = []
    statuses: list[int] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(
            {"auth": self.headers.get("Authorization"), "body": body.decode(), "path": self.path}
        )
        status = type(self).statuses.pop(0) if type(self).statuses else 200
        response = {"resourceType": "Bundle", "type": "transaction-response"}
        if status == 422:
            issue = {"severity": "error", "code": "invalid", "diagnostics": "Unknown code system"}
            response = {"resourceType": "OperationOutcome", "issue": [issue]}
        payload = json.dumps(response).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fhir_server():
    FhirHandler.received, FhirHandler.statuses = [], [503, 200, 422]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FhirHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


def test_fhir_destination_receives_transactions_with_the_token(lab_a, signer, tiny_record, fhir_server, fast_retries):
    destination = Destination.objects.create(
        laboratory=lab_a,
        name="FHIR",
        kind="fhir",
        base_url=f"http://127.0.0.1:{fhir_server}/fhir/",
        token_encrypted=tokens.encrypt("bearer-xyz"),
        timeout_s=5,
    )
    first, second = signed_slides(signer, tiny_record, 2)
    deliver_until(lambda: not OutboxMessage.objects.filter(destination=destination, status="pending").exists())
    statuses = dict(OutboxMessage.objects.values_list("control_id", "status"))
    assert statuses == {f"WBC{first.pk}V1": "delivered", f"WBC{second.pk}V1": "failed"}
    assert "Unknown code system" in OutboxMessage.objects.get(status="failed").last_error
    received = FhirHandler.received
    assert [r["auth"] for r in received] == ["Bearer bearer-xyz"] * 3 and {r["path"] for r in received} == {"/fhir"}
    assert received[0]["body"] == received[1]["body"]  # the resend after the 503 is the same transaction
    bundle = parse_bundle(received[0]["body"])
    assert bundle.identifier.value == f"WBC{first.pk}V1" and bundle.type == "transaction"
    assert {e.request.method for e in bundle.entry} == {"PUT"}  # conditional updates: a resend never duplicates


def test_delivery_state_on_the_pages_and_manual_resend(client, lab_a, signer, tiny_record, listener_factory):
    listener = listener_factory(script=["AE"])
    Destination.objects.create(laboratory=lab_a, name="LIS", kind="mllp", host="127.0.0.1", port=listener.port)
    batch = make_slide(signer, tiny_record)
    version = sign_and_send(signer, batch)
    deliver_due()
    message = OutboxMessage.objects.get(batch=batch)
    assert message.status == "failed"
    client.force_login(signer)
    slide = client.get(reverse("lis:slide", args=[batch.uid])).content.decode()
    assert f"WBC{version.pk}V1" in slide and "Failed" in slide and "Unknown test code" in slide
    listing = client.get(reverse("lis:deliveries"), {"status": "failed"}).content.decode()
    assert message.control_id in listing
    detail = client.get(reverse("lis:message", args=[message.pk])).content.decode()
    assert "AE" in detail and "MSH|" in detail
    response = client.post(reverse("lis:message_resend", args=[message.pk]), {"next": f"/lis/slides/{batch.uid}/"})
    assert response.status_code == 302 and response["Location"] == f"/lis/slides/{batch.uid}/"
    deliver_due()
    assert OutboxMessage.objects.get(pk=message.pk).status == "delivered" and listener.acked == [message.control_id]
