"""/metrics: real rows in the database -> a real scrape -> prometheus_client's own parser -> the values.

Also: who may scrape (token, allowed addresses, never through a proxy on its address alone), that a refusal is
the site's ordinary 404 whatever the method, that the HTTPS redirect leaves the scraper alone, and that no lab data
(lab, user, patient, accession, file or lab-model names) appears in the answer.
"""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from classifier.models import Prediction
from classifier.prediction_tally import LATENCY_BUCKETS_SECONDS, TALLY, aggregate
from lis.models import Destination, OutboxMessage, SlidePatient
from reports.models import Batch, BatchItem, WorkerHeartbeat
from tests.factories import ClassifierModelFactory
from wbc_ml.datasets import WBC_CLASSES
from wbcsite.settings import env_networks

TOKEN = "metrics-test-token-0123456789abcdef"
TINY_MS = [0.5, 3.0, 7.0, 40.0, 40.0, 900.0, 20000.0]  # tiny_record's images (the first made 30 minutes ago)
LAB_MODEL_MS = [12.0, 30.0]
SECRET_WORDS = ("Lab A", "tech_a", "St Elsewhere Haematology model", "ACC-SECRET-42", "cell-of-jane-doe", "MRN-998877")


def make_prediction(user, record, processing_ms: float, *, minutes_ago: float = 0.0) -> Prediction:
    prediction = Prediction.objects.create(
        laboratory=user.laboratory,
        user=user,
        model=record,
        model_version=record.version,
        model_sha256=record.sha256,
        image="cells/x.png",
        original_filename="cell-of-jane-doe.png",
        width=10,
        height=10,
        predicted_class=WBC_CLASSES[0],
        confidence=0.9,
        probabilities=[0.9, 0.025, 0.025, 0.025, 0.025],
        processing_ms=processing_ms,
    )
    if minutes_ago:
        Prediction.objects.filter(pk=prediction.pk).update(created_at=timezone.now() - timedelta(minutes=minutes_ago))
    return prediction


def make_batch(user, record, status: str, items: dict[str, int]) -> Batch:
    batch = Batch.objects.create(
        laboratory=user.laboratory, user=user, name="Slide of Jane Doe", external_id="ACC-SECRET-42", model=record
    )
    Batch.objects.filter(pk=batch.pk).update(status=status)
    position = 0
    for item_status, count in items.items():
        for _ in range(count):
            BatchItem.objects.create(batch=batch, position=position, original_filename="x.png", status=item_status)
            position += 1
    return batch


def make_heartbeat(host: str, pid: int, seconds_ago: float, *, stopped: bool = False) -> None:
    seen = timezone.now() - timedelta(seconds=seconds_ago)
    WorkerHeartbeat.objects.create(
        worker_id=f"{host}-{pid}",
        host=host,
        pid=pid,
        started_at=seen - timedelta(hours=1),
        last_seen=seen,
        stopped_at=seen if stopped else None,
    )


def make_message(batch: Batch, destination: Destination, status: str, *, minutes_ago: float = 0.0) -> None:
    message = OutboxMessage.objects.create(
        laboratory=batch.laboratory,
        destination=destination,
        batch=batch,
        format=OutboxMessage.Format.HL7,
        control_id=f"WBC{OutboxMessage.objects.count()}",
        payload="MSH|...|PID|||MRN-998877",
        status=status,
        next_attempt_at=timezone.now(),
    )
    if minutes_ago:
        OutboxMessage.objects.filter(pk=message.pk).update(created_at=timezone.now() - timedelta(minutes=minutes_ago))


@pytest.fixture(autouse=True)
def _fresh_tally():
    """The web process keeps a tally of settled predictions; each test starts from another database."""
    TALLY.forget()
    yield
    TALLY.forget()


@pytest.fixture
def lab_model(lab_a):
    return ClassifierModelFactory(name="St Elsewhere Haematology model", laboratory=lab_a, is_bundled=False)


@pytest.fixture
def busy_platform(technologist, tiny_record, lab_model):
    """A platform caught mid-work: predictions of two models, batches in every state, workers alive, stale, gone
    and stopped, and LIS messages pending, failed and delivered."""
    for index, ms in enumerate(TINY_MS):
        make_prediction(technologist, tiny_record, ms, minutes_ago=30 if index == 0 else 0)
    for ms in LAB_MODEL_MS:
        make_prediction(technologist, lab_model, ms)

    pending, done, failed = BatchItem.Status.PENDING, BatchItem.Status.DONE, BatchItem.Status.FAILED
    make_batch(technologist, tiny_record, Batch.Status.QUEUED, {pending: 3})
    make_batch(technologist, tiny_record, Batch.Status.RUNNING, {pending: 2, done: 4})
    gone = make_batch(technologist, tiny_record, Batch.Status.FAILED, {pending: 5, failed: 1})  # leftovers: not queued
    make_batch(technologist, tiny_record, Batch.Status.DONE, {done: 6})
    SlidePatient.objects.create(batch=gone, patient_id="MRN-998877")

    make_heartbeat("worker-1", 101, seconds_ago=4)
    make_heartbeat("worker-2", 202, seconds_ago=20 * 60)  # stuck for 20 minutes, not stopped
    make_heartbeat("worker-3", 303, seconds_ago=2 * 3600)  # gone two hours ago: out of the per-worker series
    make_heartbeat("worker-4", 404, seconds_ago=1, stopped=True)  # stopped cleanly: not running

    destination = Destination.objects.create(laboratory=technologist.laboratory, name="Hospital LIS", kind="mllp")
    make_message(gone, destination, OutboxMessage.Status.PENDING, minutes_ago=5)
    make_message(gone, destination, OutboxMessage.Status.PENDING)
    make_message(gone, destination, OutboxMessage.Status.FAILED, minutes_ago=30)
    for _ in range(3):
        make_message(gone, destination, OutboxMessage.Status.DELIVERED, minutes_ago=60)


def scrape(client, **headers) -> dict[str, list]:
    """GET /metrics from loopback; the samples by metric family name."""
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content[:300]
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    families = text_string_to_metric_families(response.content.decode())
    return {family.name: family.samples for family in families}


def value(samples, name: str, **labels) -> float:
    matches = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, samples)
    return matches[0]


def test_queue_depth_counts_pending_images_of_waiting_batches_only(client, busy_platform):
    metrics = scrape(client)
    assert value(metrics["wbc_queue_pending_images"], "wbc_queue_pending_images") == 3 + 2
    assert value(metrics["wbc_queue_batches"], "wbc_queue_batches", status="queued") == 1
    assert value(metrics["wbc_queue_batches"], "wbc_queue_batches", status="running") == 1


def test_predictions_counter_and_latency_histogram_per_model(client, busy_platform, lab_model):
    metrics = scrape(client)
    counter = metrics["wbc_predictions"]
    assert value(counter, "wbc_predictions_total", model="Tiny CNN v1") == len(TINY_MS)
    assert value(counter, "wbc_predictions_total", model=f"lab-model-{lab_model.pk}") == len(LAB_MODEL_MS)

    histogram = metrics["wbc_classification_latency_seconds"]
    tiny = {
        s.labels["le"]: s.value for s in histogram if s.name.endswith("_bucket") and s.labels["model"] == "Tiny CNN v1"
    }
    assert len(tiny) == len(LATENCY_BUCKETS_SECONDS) + 1
    assert tiny["0.001"] == 1  # 0.5 ms
    assert tiny["0.005"] == 2  # + 3 ms
    assert tiny["0.05"] == 5  # + 7 ms and twice 40 ms
    assert tiny["1.0"] == 6  # + 900 ms
    assert tiny["10.0"] == 6  # 20 s is over the last bound
    assert tiny["+Inf"] == len(TINY_MS)
    for bound in LATENCY_BUCKETS_SECONDS:  # cumulative, the way Prometheus reads buckets
        assert tiny[str(float(bound))] == sum(ms <= bound * 1000 for ms in TINY_MS)
    assert value(histogram, "wbc_classification_latency_seconds_count", model="Tiny CNN v1") == len(TINY_MS)
    assert value(histogram, "wbc_classification_latency_seconds_sum", model="Tiny CNN v1") == pytest.approx(
        sum(TINY_MS) / 1000
    )

    per_second = metrics["wbc_images_per_second_last_minute"]
    assert value(per_second, "wbc_images_per_second_last_minute", model="Tiny CNN v1") == pytest.approx(6 / 60)
    assert value(per_second, "wbc_images_per_second_last_minute", model=f"lab-model-{lab_model.pk}") == (
        pytest.approx(2 / 60)
    )


def test_later_scrapes_add_only_the_new_predictions_and_agree_with_a_full_count(
    client, busy_platform, technologist, tiny_record, lab_model
):
    scrape(client)
    for minutes_ago, ms in ((45, 2.0), (20, 60.0), (0, 700.0)):  # two settle into the tally, one stays recent
        make_prediction(technologist, tiny_record, ms, minutes_ago=minutes_ago)
    make_prediction(technologist, lab_model, 1.5, minutes_ago=15)

    with CaptureQueriesContext(connection) as queries:
        metrics = scrape(client)
    full = aggregate(Prediction.objects.all())
    tally = TALLY.by_model()
    assert {pk: (e.count, e.cumulative) for pk, e in tally.items()} == {
        pk: (e.count, e.cumulative) for pk, e in full.items()
    }
    assert [e.sum_seconds for e in tally.values()] == pytest.approx([full[pk].sum_seconds for pk in tally])
    counter = metrics["wbc_predictions"]
    assert (
        value(counter, "wbc_predictions_total", model="Tiny CNN v1") == len(TINY_MS) + 3 == full[tiny_record.pk].count
    )
    assert value(counter, "wbc_predictions_total", model=f"lab-model-{lab_model.pk}") == len(LAB_MODEL_MS) + 1
    histogram = metrics["wbc_classification_latency_seconds"]
    assert value(histogram, "wbc_classification_latency_seconds_bucket", model="Tiny CNN v1", le="0.0025") == 2
    assert value(histogram, "wbc_classification_latency_seconds_sum", model="Tiny CNN v1") == pytest.approx(
        (sum(TINY_MS) + 762.0) / 1000
    )
    # Cheap on a large table: after the first scrape, predictions are read only above the settled id (a primary-key
    # range), in the last minute or the newest settled one (created_at index), never counted over the whole table.
    reads = [q["sql"] for q in queries.captured_queries if 'FROM "classifier_prediction"' in q["sql"]]
    bounded = ('"classifier_prediction"."id" > ', '"classifier_prediction"."created_at" >= ', "LIMIT 1")
    assert reads and all(any(bound in sql for bound in bounded) for sql in reads), reads


def test_worker_heartbeat_ages_per_running_worker_and_the_youngest(client, busy_platform):
    metrics = scrape(client)
    ages = {(s.labels["host"], s.labels["pid"]): s.value for s in metrics["wbc_worker_heartbeat_age_seconds"]}
    assert set(ages) == {("worker-1", "101"), ("worker-2", "202")}  # not the stopped one, not the one gone for 2 h
    assert 4 <= ages["worker-1", "101"] < 60
    assert 20 * 60 <= ages["worker-2", "202"] < 21 * 60
    youngest = value(metrics["wbc_worker_heartbeat_youngest_age_seconds"], "wbc_worker_heartbeat_youngest_age_seconds")
    assert youngest == pytest.approx(ages["worker-1", "101"], abs=5)


def test_no_running_worker_is_an_infinite_heartbeat_age(client, db):
    make_heartbeat("worker-9", 909, seconds_ago=1, stopped=True)
    metrics = scrape(client)
    assert metrics["wbc_worker_heartbeat_age_seconds"] == []
    youngest = value(metrics["wbc_worker_heartbeat_youngest_age_seconds"], "wbc_worker_heartbeat_youngest_age_seconds")
    assert math.isinf(youngest)
    assert value(metrics["wbc_queue_pending_images"], "wbc_queue_pending_images") == 0


def test_lis_outbox_backlog_by_status_and_oldest_pending_age(client, busy_platform):
    metrics = scrape(client)
    backlog = metrics["wbc_lis_outbox_messages"]
    assert value(backlog, "wbc_lis_outbox_messages", status="pending") == 2
    assert value(backlog, "wbc_lis_outbox_messages", status="failed") == 1
    assert {s.labels["status"] for s in backlog} == {"pending", "failed"}  # delivered ones are not a backlog
    oldest = value(metrics["wbc_lis_outbox_oldest_pending_age_seconds"], "wbc_lis_outbox_oldest_pending_age_seconds")
    assert 5 * 60 <= oldest < 6 * 60


def test_no_laboratory_data_in_the_answer(client, busy_platform):
    body = client.get("/metrics").content.decode()
    assert "wbc_predictions_total" in body
    for word in SECRET_WORDS:
        assert word not in body


def test_openmetrics_is_offered_to_scrapers_that_ask_for_it(client, busy_platform):
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response["Content-Type"].startswith("application/openmetrics-text")
    families = {family.name: family for family in parse_openmetrics(response.content.decode())}
    assert families["wbc_predictions"].type == "counter"
    assert families["wbc_classification_latency_seconds"].type == "histogram"


# --- who may scrape ------------------------------------------------------------------------------------------------


def test_refused_from_an_address_outside_the_list_with_the_ordinary_404(client, db):
    unknown = client.get("/no-such-page", REMOTE_ADDR="10.1.2.3")
    refused = client.get("/metrics", REMOTE_ADDR="10.1.2.3")
    assert refused.status_code == unknown.status_code == 404
    assert b"wbc_" not in refused.content
    assert client.post("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 404  # not 403 (CSRF) nor 405
    assert client.post("/metrics").status_code == 405  # allowed, but only GET reads


def test_loopback_behind_a_proxy_is_not_enough(client, db):
    """A TLS proxy on the same host makes every visitor come from 127.0.0.1; its forwarding headers give it away."""
    assert client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 404
    assert client.get("/metrics", headers={"Forwarded": "for=203.0.113.9"}).status_code == 404
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::ffff:127.0.0.1").status_code == 200


def test_bearer_token_opens_it_from_anywhere(client, settings, db):
    settings.WBC_METRICS_TOKEN = TOKEN
    outside = {"REMOTE_ADDR": "198.51.100.7", "headers": {"X-Forwarded-For": "198.51.100.7"}}
    assert client.get("/metrics", **outside).status_code == 404
    for wrong in (f"Bearer {TOKEN}x", f"Token {TOKEN}", "Bearer ", TOKEN):
        assert client.get("/metrics", REMOTE_ADDR="198.51.100.7", headers={"Authorization": wrong}).status_code == 404
    right = client.get("/metrics", REMOTE_ADDR="198.51.100.7", headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    assert b"wbc_queue_pending_images" in right.content


def test_no_token_configured_means_no_token_accepted(client, settings, db):
    settings.WBC_METRICS_TOKEN = ""
    assert client.get("/metrics", REMOTE_ADDR="198.51.100.7", headers={"Authorization": "Bearer "}).status_code == 404


def test_allowed_networks_come_from_the_environment(client, settings, monkeypatch, db):
    monkeypatch.setenv("WBC_METRICS_ALLOWED_ADDRESSES", "10.0.0.0/8, 192.0.2.5")
    settings.WBC_METRICS_ALLOWED_NETWORKS = env_networks("WBC_METRICS_ALLOWED_ADDRESSES", [])
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.5").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.6").status_code == 404
    assert client.get("/metrics").status_code == 404  # loopback is no longer on the list

    monkeypatch.setenv("WBC_METRICS_ALLOWED_ADDRESSES", "10.0.0.0/8,intranet")
    with pytest.raises(ImproperlyConfigured, match="WBC_METRICS_ALLOWED_ADDRESSES"):
        env_networks("WBC_METRICS_ALLOWED_ADDRESSES", [])


def test_the_https_redirect_leaves_the_scraper_on_plain_http(client, settings, db):
    settings.SECURE_SSL_REDIRECT = True
    assert client.get("/metrics").status_code == 200
    assert client.get("/login/").status_code == 301  # everything else still goes to HTTPS
