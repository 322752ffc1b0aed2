"""LIS result messages: HL7 v2.5.1 ORU^R01 and FHIR R4 Bundles built on sign-off (and as a correction after an
amendment), parsed back with the libraries and checked field by field; the outbox rows written for every active
destination; the pull API; the code table and its per-lab overrides; lab isolation."""

from __future__ import annotations

import hl7
import pytest
from django.contrib.auth.models import Group
from django.db import transaction
from django.urls import reverse
from rest_framework.test import APIClient

from accounts.models import ApiToken, LabSettings, User
from lis.fhir import parse_bundle
from lis.hl7 import parse as parse_er7
from lis.models import Destination, LisSettings, OutboxMessage, SlidePatient
from lis.outbox import report_signed
from reports.models import ReportVersion
from reports.review import amend, countersign, reclassify, sign
from tests.conftest import make_known_batch

PASSWORD = "a-long-test-password"
# 6 neutrophils, 3 lymphocytes, 1 monocyte, all confident: nothing to review. Two neutrophils are then verified as
# a smudge cell and an erythroblast, so 8 WBC remain: N 50.0 (N), L 37.5 (N), M 12.5 (H), E 0 (L), B 0 (L).
ROWS = [(f"n{i}.png", 4, 0.97, False) for i in range(6)] + [
    ("l1.png", 2, 0.96, False),
    ("l2.png", 2, 0.96, False),
    ("l3.png", 2, 0.96, False),
    ("m1.png", 3, 0.95, False),
]
EXPECTED = {  # class -> (LOINC, value, range, flag)
    "neutrophil": ("26511-6", 50.0, "40-60", "N"),
    "lymphocyte": ("26478-8", 37.5, "20-40", "N"),
    "monocyte": ("26485-3", 12.5, "2-8", "H"),
    "eosinophil": ("26450-7", 0.0, "1-4", "L"),
    "basophil": ("30180-4", 0.0, "0.5-1", "L"),
}
AUTOMATED = {
    "neutrophil": "770-8",
    "lymphocyte": "736-9",
    "monocyte": "5905-5",
    "eosinophil": "713-8",
    "basophil": "706-2",
}


def make_slide(user, record, *, accession="ACC-2026-0042", name="Slide 42"):
    """A finished slide with two neutrophils verified as non-WBC categories (real review service)."""
    batch = make_known_batch(user, record, ROWS, name=name)
    batch.external_id = accession
    batch.save(update_fields=["external_id"])
    first, second = batch.items.filter(original_filename__in=["n0.png", "n1.png"]).order_by("position")
    reclassify(user, batch, [first.pk], "smudge")
    reclassify(user, batch, [second.pk], "erythroblast")
    return batch


def sign_and_send(user, batch) -> ReportVersion:
    """Sign with the real service: the outbox rows are written by the sign-off hook, in the same transaction."""
    return sign(user, batch, PASSWORD)


def named_user(username, lab, role, first="Ann", last="Smith"):
    user = User.objects.create_user(
        username=username, password=PASSWORD, laboratory=lab, first_name=first, last_name=last
    )
    user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def signer(lab_a):
    return named_user("asmith", lab_a, "Technologist")


@pytest.fixture
def destinations(lab_a):
    return [
        Destination.objects.create(laboratory=lab_a, name="LIS HL7", kind="mllp", host="127.0.0.1", port=2575),
        Destination.objects.create(laboratory=lab_a, name="LIS FHIR", kind="fhir", base_url="http://127.0.0.1:1/fhir"),
    ]


def api_for(user) -> APIClient:
    _token, key = ApiToken.issue(user, "LIS")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def obx_rows(message) -> dict[str, object]:
    """OBX segments by observation code (hl7apy, groups found)."""
    order = message.oru_r01_patient_result.oru_r01_order_observation
    return {g.obx.obx_3.ce_1.value: g.obx for g in order.oru_r01_observation}


def test_signing_writes_one_hl7_message_checked_field_by_field(lab_a, signer, tiny_record, destinations):
    LisSettings.objects.create(laboratory=lab_a, sending_application="WBC-AI", sending_facility="HAEM-LAB")
    batch = make_slide(signer, tiny_record)
    version = sign_and_send(signer, batch)

    rows = OutboxMessage.objects.filter(batch=batch).order_by("id")
    assert [(m.destination.name, m.format, m.status) for m in rows] == [
        ("LIS HL7", "hl7", "pending"),
        ("LIS FHIR", "fhir", "pending"),
    ]
    er7 = rows[0].payload
    assert "\n" not in er7 and er7.count("\r") >= 9  # segments end with CR
    message = parse_er7(er7)
    msh = message.msh
    assert msh.msh_3.hd_1.value == "WBC-AI" and msh.msh_4.hd_1.value == "HAEM-LAB"
    assert msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msh.msh_12.to_er7() == "2.5.1"
    assert msh.msh_10.value == rows[0].control_id == rows[1].control_id == f"WBC{version.pk}V1"
    result = message.oru_r01_patient_result
    pid3 = result.oru_r01_patient.pid.pid_3
    assert pid3.cx_1.value == "ACC-2026-0042" and pid3.cx_5.value == "ACSN"  # no patient from the LIS: accession
    order = result.oru_r01_order_observation
    assert order.orc.orc_2.ei_1.value == "ACC-2026-0042" and order.orc.orc_3.ei_1.value == str(batch.uid)
    obr = order.obr
    assert obr.obr_2.ei_1.value == "ACC-2026-0042" and obr.obr_3.ei_1.value == str(batch.uid)
    assert obr.obr_4.to_er7() == "24318-8^Manual Differential panel - Blood^LN"
    assert obr.obr_7.to_er7() == batch.created_at.strftime("%Y%m%d%H%M%S") + "+0000"
    assert obr.obr_25.value == "F"
    assert obr.obr_32.to_er7() == "asmith&Smith&Ann"

    obx = obx_rows(message)
    assert set(obx) == {*(code for code, *_ in EXPECTED.values()), "34992-8", "WBC-ERYTHROBLAST"}
    for code, value, reference, flag in EXPECTED.values():
        segment = obx[code]
        assert segment.obx_2.value == "NM" and segment.obx_3.ce_3.value == "LN"
        assert float(segment.obx_5.to_er7()) == value
        assert segment.obx_6.ce_1.value == "%" and segment.obx_7.to_er7() == reference
        assert segment.obx_8.to_er7() == flag and segment.obx_11.value == "F"
        assert segment.obx_16.to_er7() == "asmith^Smith^Ann"
        assert tiny_record.sha256 in segment.obx_17.to_er7()
    smudge = obx["34992-8"]
    assert smudge.obx_3.ce_2.value == "Smudge cells/100 leukocytes in Blood" and float(smudge.obx_5.to_er7()) == 12.5
    local = obx["WBC-ERYTHROBLAST"]
    assert local.obx_3.ce_3.value == "99WBC" and local.obx_6.ce_1.value == "/100{WBCs}"  # a local code, no LOINC
    assert float(local.obx_5.to_er7()) == 12.5 and not local.obx_8.to_er7()

    # python-hl7 reads the same message (the MLLP side uses it)
    plain = hl7.parse(er7)
    assert str(plain.segment("MSH")[10]) == rows[0].control_id
    assert [str(s[3][0][0]) for s in plain.segments("OBX")][:5] == [
        "30180-4",
        "26450-7",
        "26478-8",
        "26485-3",
        "26511-6",
    ]


def test_the_fhir_bundle_validates_and_carries_the_report(lab_a, signer, tiny_record, destinations):
    batch = make_slide(signer, tiny_record)
    sign_and_send(signer, batch)
    bundle = parse_bundle(OutboxMessage.objects.get(batch=batch, format="fhir").payload)  # validates (pydantic)

    assert bundle.type == "transaction" and len(bundle.entry) == 8
    report_entry = bundle.entry[-1]
    report = report_entry.resource
    assert report.__resource_type__ == "DiagnosticReport" and report.status == "final"
    assert report_entry.request.method == "PUT"
    assert report_entry.request.url == f"DiagnosticReport?identifier=urn:wbc-platform:report|{batch.uid}"
    assert report.category[0].coding[0].code == "LAB"
    assert (report.code.coding[0].system, report.code.coding[0].code) == ("http://loinc.org", "24318-8")
    assert report.resultsInterpreter[0].display == "Ann Smith" and report.performer[0].display == "Lab A"
    assert report.effectiveDateTime == batch.created_at and report.issued is not None
    assert report.subject.display == "Patient of accession ACC-2026-0042"
    assert len(report.result) == 7 and all(r.reference.startswith("urn:uuid:") for r in report.result)
    observations = {e.resource.code.coding[0].code: e for e in bundle.entry[:-1]}
    for code, value, reference, flag in EXPECTED.values():
        entry = observations[code]
        observation = entry.resource
        assert entry.request.url.startswith("Observation?identifier=urn:wbc-platform:report|")
        assert observation.status == "final"
        assert observation.valueQuantity.value == value and observation.valueQuantity.code == "%"
        assert observation.valueQuantity.system == "http://unitsofmeasure.org"
        low, high = (float(x) for x in reference.split("-"))
        assert (observation.referenceRange[0].low.value, observation.referenceRange[0].high.value) == (low, high)
        coding = observation.interpretation[0].coding[0]
        assert coding.system == "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
        assert coding.code == flag
        assert tiny_record.sha256 in observation.method.text
    local = observations["WBC-ERYTHROBLAST"].resource.code.coding[0]
    assert local.system == "urn:wbc-platform:codes:99WBC"


def test_an_amendment_is_sent_as_a_correction(lab_a, signer, tiny_record, destinations):
    batch = make_slide(signer, tiny_record)
    first = sign_and_send(signer, batch)
    amend(signer, batch, "Monocyte m1 was a lymphocyte")
    reclassify(signer, batch, [batch.items.get(original_filename="m1.png").pk], "lymphocyte")
    second = sign_and_send(signer, batch)

    hl7_rows = list(OutboxMessage.objects.filter(batch=batch, format="hl7").order_by("id"))
    assert [m.control_id for m in hl7_rows] == [f"WBC{first.pk}V1", f"WBC{second.pk}V2"]
    assert [m.is_correction for m in hl7_rows] == [False, True]
    message = parse_er7(hl7_rows[1].payload)
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.value == "C"
    obx = obx_rows(message)
    assert {s.obx_11.value for s in obx.values()} == {"C"}
    assert float(obx["26485-3"].obx_5.to_er7()) == 0.0 and obx["26485-3"].obx_8.to_er7() == "L"
    notes = [n.nte_3.value for n in order.nte]
    assert any("Monocyte m1 was a lymphocyte" in n for n in notes)
    bundle = parse_bundle(OutboxMessage.objects.get(batch=batch, format="fhir", report_version=second).payload)
    assert bundle.entry[-1].resource.status == "corrected"
    assert "Monocyte m1 was a lymphocyte" in bundle.entry[-1].resource.conclusion
    assert {e.resource.status for e in bundle.entry[:-1]} == {"corrected"}
    # the same report identifier: the LIS replaces version 1 instead of adding a second report
    original = parse_bundle(OutboxMessage.objects.get(batch=batch, format="fhir", report_version=first).payload)
    assert bundle.entry[-1].request.url == original.entry[-1].request.url


def test_the_outbox_rows_share_the_sign_off_transaction(lab_a, signer, tiny_record, destinations):
    batch = make_slide(signer, tiny_record)
    with pytest.raises(RuntimeError), transaction.atomic():
        sign(signer, batch, PASSWORD)
        assert OutboxMessage.objects.filter(batch=batch).count() == 2  # written by the hook, inside
        raise RuntimeError("the sign-off fails after the version was saved")
    assert not ReportVersion.objects.filter(batch=batch).exists()
    assert not OutboxMessage.objects.filter(batch=batch).exists()  # gone with it: never a message for no report


def test_two_person_labs_send_only_once_countersigned(lab_a, signer, tiny_record, destinations):
    LabSettings.objects.create(laboratory=lab_a, two_person_signoff=True)
    supervisor = named_user("bjones", lab_a, "Supervisor", "Bob", "Jones")
    batch = make_slide(signer, tiny_record)
    version = sign_and_send(signer, batch)
    assert not OutboxMessage.objects.filter(batch=batch).exists()  # signed, awaiting countersign: nothing sent
    version = countersign(supervisor, batch, PASSWORD)
    report_signed(version)  # a second call writes nothing new
    assert OutboxMessage.objects.filter(batch=batch).count() == 2
    message = parse_er7(OutboxMessage.objects.get(batch=batch, format="hl7").payload)
    assert message.oru_r01_patient_result.oru_r01_order_observation.obr.obr_25.value == "F"


def test_patient_id_supplied_by_the_lis_goes_in_pid(lab_a, signer, tiny_record, destinations):
    batch = make_slide(signer, tiny_record)
    api = api_for(signer)
    response = api.put(
        reverse("api:batch-lis-patient", args=[batch.uid]),
        {"patient_id": "MRN-778812", "assigning_authority": "HOSP"},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert SlidePatient.objects.get(batch=batch).patient_id == "MRN-778812"
    sign_and_send(signer, batch)
    message = parse_er7(OutboxMessage.objects.get(batch=batch, format="hl7").payload)
    pid3 = message.oru_r01_patient_result.oru_r01_patient.pid.pid_3
    assert (pid3.cx_1.value, pid3.cx_4.to_er7(), pid3.cx_5.value) == ("MRN-778812", "HOSP", "MR")
    report = parse_bundle(OutboxMessage.objects.get(batch=batch, format="fhir").payload).entry[-1].resource
    assert report.subject.identifier.value == "MRN-778812"


def test_free_text_is_escaped_not_broken(lab_a, signer, tiny_record, destinations):
    batch = make_slide(signer, tiny_record)
    sign_and_send(signer, batch)
    amend(signer, batch, "Typo | in ^ the & report ~ fixed \\ here")
    second = sign_and_send(signer, batch)
    er7 = OutboxMessage.objects.get(report_version=second, format="hl7").payload
    plain = hl7.parse(er7)
    notes = [plain.unescape(str(s[3])) for s in plain.segments("NTE")]
    assert "Corrected report (version 2): Typo | in ^ the & report ~ fixed \\ here" in notes
    assert len(plain.segments("OBX")) == 7  # the separators in the text did not make new fields or segments


def test_pull_api_returns_the_current_version_in_both_formats(lab_a, signer, tiny_record, outsider):
    batch = make_slide(signer, tiny_record)
    api = api_for(signer)
    url_hl7 = reverse("api:batch-lis-hl7", args=[batch.uid])
    url_fhir = reverse("api:batch-lis-fhir", args=[batch.uid])
    refused = api.get(url_hl7)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_signed"
    first = sign_and_send(signer, batch)
    response = api.get(url_hl7)
    assert response.status_code == 200 and response["Content-Type"].startswith("x-application/hl7-v2+er7")
    assert parse_er7(response.content.decode()).msh.msh_10.value == f"WBC{first.pk}V1"
    amend(signer, batch, "recount")
    assert parse_er7(api.get(url_hl7).content.decode()).msh.msh_10.value == f"WBC{first.pk}V1"  # open amendment
    second = sign_and_send(signer, batch)
    assert api.get(url_hl7)["X-Message-Control-Id"] == f"WBC{second.pk}V2"
    fhir = api.get(url_fhir, HTTP_ACCEPT="application/fhir+json")
    assert fhir.status_code == 200 and fhir["Content-Type"].startswith("application/fhir+json")
    assert parse_bundle(fhir.content).entry[-1].resource.status == "corrected"
    # another lab's slide is a 404, whatever the format
    other = api_for(outsider)
    assert other.get(url_hl7).status_code == 404 and other.get(url_fhir).status_code == 404
    assert other.put(reverse("api:batch-lis-patient", args=[batch.uid]), {"patient_id": "x"}).status_code == 404
    schema = api.get(reverse("api:schema"), HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    assert "/api/v1/batches/{uid}/hl7/" in schema["paths"] and "/api/v1/batches/{uid}/fhir/" in schema["paths"]


def test_ai_only_results_only_when_the_lab_sends_them(lab_a, signer, tiny_record):
    batch = make_slide(signer, tiny_record)
    api = api_for(signer)
    url = reverse("api:batch-lis-hl7", args=[batch.uid])
    assert api.get(url).status_code == 409
    LisSettings.objects.filter(laboratory=lab_a).update(send_ai_only=True)  # made on the first request
    message = parse_er7(api.get(url).content.decode())
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_4.ce_1.value == "57023-4" and order.obr.obr_25.value == "P"
    codes = set(obx_rows(message))
    assert set(AUTOMATED.values()) <= codes and not codes & {code for code, *_ in EXPECTED.values()}
    assert not order.obr.obr_32.to_er7()  # nobody signed it


def test_code_table_is_shown_and_overridable_per_lab(client, lab_a, lab_b, signer, tiny_record, destinations):
    supervisor = named_user("bjones", lab_a, "Supervisor", "Bob", "Jones")
    client.force_login(signer)
    page = client.get(reverse("lis:settings"))
    assert page.status_code == 200
    html = page.content.decode()
    for code in ("24318-8", "26511-6", "30180-4", "34992-8", "770-8", "WBC-ERYTHROBLAST"):
        assert code in html
    assert client.post(reverse("lis:settings"), {}).status_code == 403  # a technologist only reads it

    client.force_login(supervisor)
    form = {
        "settings-sending_application": "WBC-AI",
        "settings-local_coding_system": "L",
        "code-erythroblast-code": "NRBC100",
        "code-erythroblast-text": "NRBC per 100 WBC",
    }
    assert client.post(reverse("lis:settings"), form).status_code == 302
    batch = make_slide(signer, tiny_record)
    sign_and_send(signer, batch)
    obx = obx_rows(parse_er7(OutboxMessage.objects.get(batch=batch, format="hl7").payload))
    assert obx["NRBC100"].obx_3.ce_2.value == "NRBC per 100 WBC" and obx["NRBC100"].obx_3.ce_3.value == "L"
    assert "WBC-ERYTHROBLAST" not in obx
    # lab B's table is untouched
    assert LisSettings.for_lab(lab_b.pk).code_overrides == {}


def test_destinations_and_messages_stay_in_their_lab(client, lab_a, lab_b, signer, tiny_record, destinations):
    other = named_user("cbrown", lab_b, "Supervisor", "Cy", "Brown")
    Destination.objects.create(laboratory=lab_b, name="B HL7", kind="mllp", host="127.0.0.1", port=2576)
    batch = make_slide(signer, tiny_record)
    sign_and_send(signer, batch)
    assert set(OutboxMessage.objects.values_list("destination__laboratory", flat=True)) == {lab_a.pk}
    message = OutboxMessage.objects.filter(batch=batch).first()
    client.force_login(other)
    assert client.get(reverse("lis:message", args=[message.pk])).status_code == 404
    assert client.post(reverse("lis:message_resend", args=[message.pk])).status_code == 404
    assert client.get(reverse("lis:slide", args=[batch.uid])).status_code == 404
    assert client.get(reverse("lis:destination_edit", args=[destinations[0].pk])).status_code == 404
    listing = client.get(reverse("lis:deliveries")).content.decode()
    assert message.control_id not in listing
    settings_page = client.get(reverse("lis:settings")).content.decode()
    assert "B HL7" in settings_page and "LIS HL7" not in settings_page


def test_fhir_token_is_stored_encrypted_and_never_shown(client, lab_a, settings):
    supervisor = named_user("bjones", lab_a, "Supervisor", "Bob", "Jones")
    client.force_login(supervisor)
    secret = "s3cr3t-bearer-token-value"
    form = {
        "name": "FHIR",
        "kind": "fhir",
        "is_active": "on",
        "base_url": "https://fhir.example.org/r4",
        "token": secret,
    }
    form["timeout_s"] = "5"
    assert client.post(reverse("lis:destination_new"), form).status_code == 302
    destination = Destination.objects.get(name="FHIR")
    assert secret not in destination.token_encrypted and destination.token_encrypted
    from lis.tokens import bearer_token

    assert bearer_token(destination) == secret
    for url in (reverse("lis:settings"), reverse("lis:destination_edit", args=[destination.pk])):
        page = client.get(url).content.decode()
        assert secret not in page and destination.token_encrypted not in page
    assert "set (encrypted)" in client.get(reverse("lis:settings")).content.decode()
    form.pop("token")  # saving without a token keeps the stored one
    form["name"] = "FHIR prod"
    assert client.post(reverse("lis:destination_edit", args=[destination.pk]), form).status_code == 302
    destination.refresh_from_db()
    assert bearer_token(destination) == secret and destination.name == "FHIR prod"


def test_the_slide_page_shows_what_was_sent_to_the_lis(client, signer, tiny_record, destinations):
    batch = make_slide(signer, tiny_record)
    client.force_login(signer)
    before = client.get(reverse("reports:batch", args=[batch.uid])).text
    assert 'id="lis-deliveries"' not in before  # nothing is sent before sign-off
    sign_and_send(signer, batch)
    page = client.get(reverse("reports:batch", args=[batch.uid])).text
    assert 'id="lis-deliveries"' in page and "LIS HL7" in page and "LIS FHIR" in page


def test_only_lab_managers_see_the_lab_settings_link(client, signer, lab_a):
    client.force_login(signer)
    assert reverse("accounts:lab_settings") not in client.get(reverse("classifier:history")).text
    supervisor = named_user("boss", lab_a, "Supervisor")
    client.force_login(supervisor)
    assert reverse("accounts:lab_settings") in client.get(reverse("classifier:history")).text
