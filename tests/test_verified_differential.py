"""The verified differential: effective classes, non-WBC categories per 100 WBC, the count target, H/L/N flags at
the range edges, absolute counts, AI-vs-technologist agreement, and the out-of-scope warning on the slide page and
the printable report (a slide of cells the tiny real model flags)."""

import csv
import io
import json

import pytest
from django.urls import reverse
from django.utils import timezone

from accounts.models import LabSettings
from reports.differential import OUT_OF_SCOPE_WARNING, build_differential, range_flag
from reports.models import BatchItem, CellVerification
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from reports.worker import process_batch_now
from tests.conftest import image_bytes, make_known_batch


def _rows(counts: dict[int, int], confidence: float = 0.99):
    return [(f"c{index}-{n}.png", index, confidence, False) for index, total in counts.items() for n in range(total)]


def _verify(batch, user, filenames, new_class):
    for name in filenames:
        CellVerification.objects.create(
            item=batch.items.get(original_filename=name),
            verified_class=new_class,
            verified_by=user,
            verified_at=timezone.now(),
        )


@pytest.mark.parametrize(
    ("value", "flag"),
    [(39.9, "L"), (40.0, "N"), (50.0, "N"), (60.0, "N"), (60.1, "H"), (None, "")],
)
def test_range_edges_are_normal(value, flag):
    assert range_flag(value, [40.0, 60.0]) == flag


def test_flags_at_the_range_edges_on_a_real_count(technologist, tiny_record):
    # 100 WBC: neutrophil 40 (low edge), lymphocyte 40 (high edge), monocyte 8 (high edge), eosinophil 12 (H),
    # basophil 0 (L against 0.5–1)
    batch = make_known_batch(technologist, tiny_record, _rows({4: 40, 2: 40, 3: 8, 1: 12}))
    report = build_differential(batch, 0.85)
    flags = {t.name: (t.shown_percent, t.flag) for t in report.tallies}
    assert flags == {
        "neutrophil": (40.0, "N"),
        "lymphocyte": (40.0, "N"),
        "monocyte": (8.0, "N"),
        "eosinophil": (12.0, "H"),
        "basophil": (0.0, "L"),
    }
    assert report.counts == {"counted": 100, "target": 100, "short": False}


def test_non_wbc_categories_leave_the_differential_and_count_per_100_wbc(technologist, tiny_record, lab_a):
    batch = make_known_batch(technologist, tiny_record, _rows({4: 6, 2: 4}))
    batch.wbc_count = 7.5
    batch.save()
    _verify(batch, technologist, ["c4-0.png", "c4-1.png"], "platelet")  # two "neutrophils" were platelets
    _verify(batch, technologist, ["c2-0.png"], "neutrophil")  # a "lymphocyte" was a neutrophil
    _verify(batch, technologist, ["c2-1.png"], "lymphocyte")  # confirmed
    report = build_differential(batch, 0.85)
    assert report.classified == 10 and report.wbc_counted == 8
    tallies = {t.name: (t.count, t.shown_percent, t.absolute) for t in report.tallies}
    assert tallies["neutrophil"] == (5, 62.5, 4.69)  # 4 AI neutrophils left + 1 reclassified; 62.5% of 7.5
    assert tallies["lymphocyte"] == (3, 37.5, 2.81)
    assert [(c.key, c.count, c.per_100_wbc) for c in report.non_wbc] == [("platelet", 2, 25.0)]
    assert report.counts == {"counted": 8, "target": 100, "short": True}
    overall = report.agreement_overall
    assert (overall.verified, overall.agreeing) == (4, 1)
    per_class = {a.name: (a.verified, a.agreeing) for a in report.agreement}
    assert per_class["neutrophil"] == (2, 0) and per_class["lymphocyte"] == (2, 1)


def test_count_target_follows_the_lab(technologist, tiny_record, lab_a):
    LabSettings.objects.update_or_create(laboratory=lab_a, defaults={"count_target": 200})
    batch = make_known_batch(technologist, tiny_record, _rows({4: 150}))
    assert build_differential(batch, 0.85).counts == {"counted": 150, "target": 200, "short": True}


def test_csv_and_api_carry_the_verified_class(tech_client, technologist, tiny_record, client):
    batch = make_known_batch(technologist, tiny_record, _rows({4: 2}))
    _verify(batch, technologist, ["c4-0.png"], "smudge")
    text = tech_client.get(reverse("reports:batch_csv", args=[batch.uid])).text
    rows = {r["filename"]: r for r in csv.DictReader(io.StringIO(text))}
    assert rows["c4-0.png"]["predicted_class"] == "neutrophil" and rows["c4-0.png"]["verified_class"] == "smudge"
    assert rows["c4-0.png"]["verified_by"] == "tech_a" and rows["c4-1.png"]["verified_class"] == ""
    assert rows["c4-0.png"]["is_outlier"] == "no" and rows["c4-0.png"]["model_version"] == "1"
    summary = list(
        csv.reader(io.StringIO(tech_client.get(reverse("reports:batch_summary_csv", args=[batch.uid])).text))
    )
    by_class = {r[0]: r for r in summary}
    assert by_class["neutrophil"][1:4] == ["1", "100.0", "H"]  # 1 WBC counted, all neutrophil: H against 40–60
    assert by_class["smudge"][6] == "100.0"  # 1 smudge per 1 WBC = 100 per 100 WBC

    detail = tech_client.get(reverse("api:batch-detail", args=[batch.uid])).json()
    assert detail["review"]["state"] == "in review" and detail["review"]["locked"] is False
    neutrophil = next(c for c in detail["differential"]["classes"] if c["class_name"] == "neutrophil")
    assert neutrophil["flag"] == "H" and neutrophil["reference_low"] == 40.0
    assert detail["differential"]["non_wbc"][0]["key"] == "smudge"
    first = detail["results"][0]
    assert first["verified_class"] == "smudge" and first["effective_class"] == "smudge"
    assert first["predicted_class"] == "neutrophil"


def test_wbc_count_is_settable_until_signed(tech_client, technologist, tiny_record):
    batch = make_known_batch(technologist, tiny_record, _rows({4: 2}))
    url = reverse("api:batch-detail", args=[batch.uid])
    response = tech_client.patch(url, json.dumps({"wbc_count": 6.0}), content_type="application/json")
    assert response.status_code == 200 and response.json()["wbc_count"] == 6.0
    neutrophil = next(c for c in response.json()["differential"]["classes"] if c["class_name"] == "neutrophil")
    assert neutrophil["absolute"] == 6.0
    for wrong in (-1, "6", True):  # out of range; in JSON a number must be a JSON number
        bad = tech_client.patch(url, json.dumps({"wbc_count": wrong}), content_type="application/json")
        assert bad.status_code == 400
    assert tech_client.patch(url, "wbc_count=6", content_type="application/x-www-form-urlencoded").status_code == 415
    page = tech_client.post(reverse("reports:wbc_count", args=[batch.uid]), {"wbc_count": "5,5"})
    assert page.status_code == 302
    batch.refresh_from_db()
    assert batch.wbc_count == 5.5
    signed = tech_client.post(reverse("reports:review_sign", args=[batch.uid]), {"password": "a-long-test-password"})
    assert signed.status_code == 302
    locked = tech_client.patch(url, json.dumps({"wbc_count": 9.0}), content_type="application/json")
    assert locked.status_code == 409
    assert tech_client.post(reverse("reports:wbc_count", args=[batch.uid]), {"wbc_count": "9"}).status_code == 409
    batch.refresh_from_db()
    assert batch.wbc_count == 5.5


@pytest.mark.django_db(transaction=True)
def test_out_of_scope_banner_on_a_slide_the_model_flags(technologist, tiny_record, client):
    """The tiny untrained model is unsure about everything (≈0.2 per class), like a model facing images unlike its
    training data: every cell is flagged, so the slide and its printable report carry the warning."""
    entries = [
        NamedBytes(f"odd{i}.png", image_bytes(size=(70, 64), color=(30 + 40 * i, 200 - 30 * i, 90))) for i in range(4)
    ]
    batch = submit_batch(technologist, entries, tiny_record, name="Unlike the training data")
    assert process_batch_now(batch.pk) == "done"
    items = list(batch.items.select_related("prediction").filter(status=BatchItem.Status.DONE))
    assert len(items) == 4 and all(i.prediction.needs_review(batch.threshold) for i in items)
    report = build_differential(batch, batch.threshold)
    assert report.out_of_scope == {"share": 1.0, "limit": 0.3, "warn": True}
    client.force_login(technologist)
    slide_page = client.get(reverse("reports:batch", args=[batch.uid])).text
    assert 'id="out-of-scope"' in slide_page and OUT_OF_SCOPE_WARNING.replace("'", "&#x27;") in slide_page
    printed = client.get(reverse("reports:report_print", args=[batch.uid])).text
    assert 'id="out-of-scope"' in printed and "<script" not in printed
    state = client.get(reverse("reports:review_state", args=[batch.uid])).json()
    assert state["out_of_scope"]["warn"] is True
    assert {c["flag_reason"] for c in state["cells"]} <= {"low confidence", "unlike the five white-cell classes"}
    # a lab that tolerates more flagged cells sees no warning
    LabSettings.objects.update_or_create(laboratory=technologist.laboratory, defaults={"out_of_scope_limit": 1.0})
    assert 'id="out-of-scope"' not in client.get(reverse("reports:batch", args=[batch.uid])).text


def test_no_warning_on_a_clean_slide(tech_client, technologist, tiny_record):
    batch = make_known_batch(technologist, tiny_record, _rows({4: 9, 2: 1}))
    assert 'id="out-of-scope"' not in tech_client.get(reverse("reports:batch", args=[batch.uid])).text
