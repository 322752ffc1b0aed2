"""Issue 16: a lab that sends AI-only results gets the preliminary (unsigned, status P, automated-differential
codes) result of every batch the worker finishes, pushed through the outbox to each active destination; signing
the slide later sends the final result as before. Batches are classified by the real worker code (tiny model)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from lis.delivery import ResendRefused, resend
from lis.fhir import parse_bundle
from lis.hl7 import parse as parse_er7
from lis.models import Destination, LisSettings, OutboxMessage
from lis.outbox import report_ai_only_finished
from reports.models import Batch
from reports.review import reclassify
from reports.submission import NamedBytes, submit_batch
from reports.worker import process_batch_now
from tests.conftest import image_bytes
from tests.test_lis_messages import AUTOMATED, EXPECTED, named_user, obx_rows, sign_and_send

pytestmark = pytest.mark.django_db(transaction=True)  # the worker's commit runs the finished-batch hook for real


@pytest.fixture
def signer(lab_a):
    return named_user("asmith", lab_a, "Technologist")


@pytest.fixture
def destinations(lab_a) -> list[Destination]:
    Destination.objects.create(
        laboratory=lab_a, name="Old LIS", kind="mllp", host="127.0.0.1", port=2576, is_active=False
    )
    return [
        Destination.objects.create(laboratory=lab_a, name="LIS HL7", kind="mllp", host="127.0.0.1", port=2575),
        Destination.objects.create(laboratory=lab_a, name="LIS FHIR", kind="fhir", base_url="http://127.0.0.1:1/fhir"),
    ]


def classified_batch(user, record) -> Batch:
    """A slide submitted as a user would and classified by the worker's own code, in this process."""
    entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(40 * i, 100, 200))) for i in range(4)]
    batch = submit_batch(user, entries, record, name="Slide AI", external_id="ACC-AI-1")
    assert process_batch_now(batch.pk) == "done"
    batch.refresh_from_db()
    assert batch.status == Batch.Status.DONE
    return batch


def sign_everything(user, batch: Batch):
    """Verify every cell (so nothing is left to review) and sign with the real service."""
    reclassify(user, batch, list(batch.items.values_list("pk", flat=True)), "neutrophil")
    return sign_and_send(user, batch)


def test_a_finished_batch_pushes_its_ai_only_result_then_the_signed_one(
    client, lab_a, signer, tiny_record, destinations
):
    LisSettings.objects.create(laboratory=lab_a, send_ai_only=True)
    batch = classified_batch(signer, tiny_record)

    rows = list(OutboxMessage.objects.filter(batch=batch).select_related("destination").order_by("id"))
    assert [(m.destination.name, m.format, m.status) for m in rows] == [
        ("LIS HL7", "hl7", "pending"),
        ("LIS FHIR", "fhir", "pending"),
    ]  # one per active destination, none for the inactive one
    assert {m.control_id for m in rows} == {f"WBCAI{batch.pk}"}
    assert all(m.report_version is None and not m.is_correction for m in rows)

    message = parse_er7(rows[0].payload)
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_4.ce_1.value == "57023-4" and order.obr.obr_25.value == "P"
    assert not order.obr.obr_32.to_er7()  # nobody signed it
    codes = obx_rows(message)
    assert set(AUTOMATED.values()) <= set(codes)
    assert not set(codes) & {code for code, *_ in EXPECTED.values()}  # no manual-differential codes
    assert all(segment.obx_11.value == "P" for segment in codes.values())
    counted = sum(float(codes[code].obx_5.to_er7()) for code in AUTOMATED.values())
    assert counted == pytest.approx(100.0, abs=0.5)  # the worker's predictions, as percentages

    bundle = parse_bundle(rows[1].payload)  # validates (pydantic)
    report = bundle.entry[-1].resource
    assert report.__resource_type__ == "DiagnosticReport" and report.status == "preliminary"
    assert not report.resultsInterpreter
    observations = [e.resource for e in bundle.entry[:-1]]
    assert {o.status for o in observations} == {"preliminary"}
    assert set(AUTOMATED.values()) <= {o.code.coding[0].code for o in observations}

    report_ai_only_finished(batch)  # once per batch: the control id is stable
    assert OutboxMessage.objects.filter(batch=batch).count() == 2
    client.force_login(signer)
    assert "AI-only" in client.get(reverse("lis:slide", args=[batch.uid])).content.decode()

    version = sign_everything(signer, batch)
    final = list(OutboxMessage.objects.filter(batch=batch, report_version=version).order_by("id"))
    assert [m.destination_id for m in final] == [d.pk for d in destinations]
    assert all(m.pk > max(r.pk for r in rows) for m in final)  # each destination gets them in order: P, then F
    assert final[0].control_id == f"WBC{version.pk}V1" != rows[0].control_id
    obr = parse_er7(final[0].payload).oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_25.value == "F" and obr.obr_4.ce_1.value == "24318-8"
    assert parse_bundle(final[1].payload).entry[-1].resource.status == "final"

    with pytest.raises(ResendRefused):  # the preliminary result must not overwrite the final one at the LIS
        resend(rows[0])
    report_ai_only_finished(batch)  # nor be written again once signed
    assert OutboxMessage.objects.filter(batch=batch).count() == 4


def test_no_ai_only_result_unless_the_lab_sends_them(lab_a, signer, tiny_record, destinations):
    assert not LisSettings.for_lab(lab_a.pk).send_ai_only  # the default
    batch = classified_batch(signer, tiny_record)
    assert not OutboxMessage.objects.filter(batch=batch).exists()

    version = sign_everything(signer, batch)
    rows = list(OutboxMessage.objects.filter(batch=batch).order_by("id"))
    assert [(m.destination_id, m.report_version_id) for m in rows] == [(d.pk, version.pk) for d in destinations]
    message = parse_er7(rows[0].payload)
    assert message.oru_r01_patient_result.oru_r01_order_observation.obr.obr_25.value == "F"
