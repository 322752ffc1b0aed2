"""Slide review and sign-off: reclassification through the review endpoints, signing with the password typed again,
refusals with their reasons, two-person sign-off, amendments and lab isolation."""

import json

import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from accounts.models import LabSettings
from reports.models import CellVerification, ReportVersion
from reports.review import AMENDING, AWAITING_COUNTERSIGN, FINAL, IN_REVIEW, slide_state
from tests.conftest import make_known_batch
from tests.factories import TEST_PASSWORD, UserFactory

ROWS = [  # file, class index (0 basophil … 4 neutrophil), confidence, outlier
    ("n1.png", 4, 0.99, False),
    ("n2.png", 4, 0.97, False),
    ("low.png", 2, 0.60, False),  # low confidence: to review
    ("odd.png", 4, 0.98, True),  # outlier: to review
]


@pytest.fixture
def slide(technologist, tiny_record):
    return make_known_batch(technologist, tiny_record, ROWS)


def _member(lab, username, role):
    user = UserFactory(username=username, laboratory=lab)
    user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def supervisor(lab_a):
    return _member(lab_a, "super_a", "Supervisor")


def _ids(slide, *names):
    return [slide.items.get(original_filename=n).pk for n in names]


def _classify(client, slide, cells, new_class):
    return client.post(
        reverse("reports:review_classify", args=[slide.uid]),
        json.dumps({"cells": cells, "class": new_class}),
        content_type="application/json",
    )


def _sign(client, slide, action="review_sign", **data):
    return client.post(reverse(f"reports:{action}", args=[slide.uid]), data, HTTP_ACCEPT="application/json")


def _review_all(client, slide):
    response = _classify(client, slide, _ids(slide, "low.png"), "lymphocyte")
    assert response.status_code == 200
    assert _classify(client, slide, _ids(slide, "odd.png"), "platelet").status_code == 200


def test_state_lists_cells_flags_categories_and_counts(tech_client, slide):
    state = tech_client.get(reverse("reports:review_state", args=[slide.uid])).json()
    assert state["state"] == IN_REVIEW and state["version"] is None and state["locked"] is False
    cells = {c["id"]: c for c in state["cells"]}
    assert len(cells) == 4  # the failed file is not a cell
    low, odd = (cells[i] for i in _ids(slide, "low.png", "odd.png"))
    assert low["flagged"] and low["flag_reason"] == "low confidence"
    assert odd["flagged"] and odd["flag_reason"] == "unlike the five white-cell classes"
    assert cells[_ids(slide, "n1.png")[0]]["flag_reason"] == ""
    keys = [(c["key"], c["hotkey"], c["is_wbc"]) for c in state["categories"]]
    assert keys[:5] == [
        ("basophil", "1", True),
        ("eosinophil", "2", True),
        ("lymphocyte", "3", True),
        ("monocyte", "4", True),
        ("neutrophil", "5", True),
    ]
    assert ("platelet", "8", False) in keys
    assert state["counts"] == {"counted": 4, "target": 100, "short": True}
    assert state["differential"]["to_review"] == 2


def test_reclassifying_many_cells_at_once_records_the_user_and_updates_the_differential(
    tech_client, slide, technologist
):
    response = _classify(tech_client, slide, _ids(slide, "n1.png", "odd.png"), "platelet")
    assert response.status_code == 200
    body = response.json()
    assert {c["verified_class"] for c in body["cells"]} == {"platelet"}
    assert {c["verified_by"] for c in body["cells"]} == {"tech_a"}
    by_class = {row["class"]: row["count"] for row in body["differential"]["differential"]}
    assert by_class["neutrophil"] == 1 and body["counts"]["counted"] == 2
    assert body["differential"]["non_wbc"] == [
        {"key": "platelet", "label": "Platelet / platelet clump", "count": 2, "per_100_wbc": 100.0}
    ]
    verifications = CellVerification.objects.filter(item__batch=slide)
    assert verifications.count() == 2 and {v.verified_by for v in verifications} == {technologist}
    # the AI's class stays beside the technologist's, never overwritten
    assert slide.items.get(original_filename="n1.png").prediction.predicted_class == "neutrophil"


def test_undo_removes_the_verification(tech_client, slide):
    cell = _ids(slide, "low.png")
    _classify(tech_client, slide, cell, "monocyte")
    response = _classify(tech_client, slide, cell, None)
    assert response.status_code == 200 and response.json()["cells"][0]["verified_class"] is None
    assert not CellVerification.objects.filter(item__batch=slide).exists()


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"cells": [], "class": "monocyte"}, 400),
        ({"cells": ["x"], "class": "monocyte"}, 400),
        ({"class": "monocyte"}, 400),
        ({"cells": [1], "class": "unicorn"}, 400),
    ],
)
def test_bad_reclassification_requests_are_refused_and_change_nothing(tech_client, slide, payload, status):
    response = tech_client.post(
        reverse("reports:review_classify", args=[slide.uid]), json.dumps(payload), content_type="application/json"
    )
    assert response.status_code == status and response.json()["error"]["message"]
    assert not CellVerification.objects.exists()


def test_a_cell_of_another_slide_is_refused(tech_client, slide, technologist, tiny_record):
    other = make_known_batch(technologist, tiny_record, ROWS, name="Other slide")
    response = _classify(tech_client, slide, _ids(slide, "n1.png") + _ids(other, "n1.png"), "monocyte")
    assert response.status_code == 400
    assert not CellVerification.objects.exists()  # one transaction: nothing half-done


def test_signing_is_refused_while_cells_remain_to_review(tech_client, slide):
    response = _sign(tech_client, slide, password=TEST_PASSWORD)
    assert response.status_code == 400
    assert "2 flagged cells still to review" in response.json()["error"]["message"]
    assert not ReportVersion.objects.exists()


def test_signing_needs_the_password_typed_again(tech_client, slide):
    _review_all(tech_client, slide)
    response = _sign(tech_client, slide, password="wrong")
    assert response.status_code == 403 and "password" in response.json()["error"]["message"]
    assert not ReportVersion.objects.exists()


def test_sign_locks_the_slide_and_keeps_a_snapshot(tech_client, slide, technologist):
    _review_all(tech_client, slide)
    response = _sign(tech_client, slide, password=TEST_PASSWORD)
    assert response.status_code == 200 and response.json() == {"state": FINAL, "version": 1, "locked": True}
    version = ReportVersion.objects.get(batch=slide)
    assert version.signed_by == technologist and version.number == 1
    snap = version.snapshot
    assert snap["signed_by"] == "tech_a" and snap["version"] == 1 and snap["slide"] == "Known slide"
    assert {r["class"]: r["count"] for r in snap["differential"]}["lymphocyte"] == 1
    assert snap["non_wbc"][0]["key"] == "platelet"
    assert snap["verifiers"] == [{"user": "tech_a", "cells": 2}]
    # locked: reclassification and a second signature are refused with 409
    locked = _classify(tech_client, slide, _ids(slide, "n1.png"), "monocyte")
    assert locked.status_code == 409 and "locked" in locked.json()["error"]["message"]
    assert _sign(tech_client, slide, password=TEST_PASSWORD).status_code == 409


def test_require_all_verified_refuses_until_every_cell_is_verified(tech_client, slide, lab_a):
    LabSettings.objects.update_or_create(laboratory=lab_a, defaults={"require_all_verified": True})
    _review_all(tech_client, slide)
    response = _sign(tech_client, slide, password=TEST_PASSWORD)
    assert response.status_code == 400 and "2 cells are not verified" in response.json()["error"]["message"]
    _classify(tech_client, slide, _ids(slide, "n1.png", "n2.png"), "neutrophil")
    assert _sign(tech_client, slide, password=TEST_PASSWORD).status_code == 200


def test_two_person_signoff_needs_a_supervisor_who_is_not_the_signer(client, slide, lab_a, supervisor, technologist):
    LabSettings.objects.update_or_create(laboratory=lab_a, defaults={"two_person_signoff": True})
    client.force_login(supervisor)
    _review_all(client, slide)
    assert _sign(client, slide, password=TEST_PASSWORD).json()["state"] == AWAITING_COUNTERSIGN
    # the signer cannot countersign
    same = _sign(client, slide, "review_countersign", password=TEST_PASSWORD)
    assert same.status_code == 403 and "second person" in same.json()["error"]["message"]
    # a technologist is not a supervisor
    client.force_login(technologist)
    tech = _sign(client, slide, "review_countersign", password=TEST_PASSWORD)
    assert tech.status_code == 403 and "Supervisor" in tech.json()["error"]["message"]
    # a second supervisor countersigns
    client.force_login(_member(lab_a, "super_two", "Supervisor"))
    done = _sign(client, slide, "review_countersign", password=TEST_PASSWORD)
    assert done.status_code == 200 and done.json()["state"] == FINAL
    version = ReportVersion.objects.get(batch=slide)
    assert version.countersigned_by.username == "super_two" and version.snapshot["countersigned_by"] == "super_two"


def test_amendment_opens_version_2_and_version_1_stays_readable(tech_client, slide):
    _review_all(tech_client, slide)
    _sign(tech_client, slide, password=TEST_PASSWORD)
    refused = _sign(tech_client, slide, "review_amend", reason="  ")
    assert refused.status_code == 400 and "reason" in refused.json()["error"]["message"]
    opened = _sign(tech_client, slide, "review_amend", reason="the odd cell is a smudge cell")
    assert opened.status_code == 200 and opened.json() == {"state": AMENDING, "version": 2, "locked": False}
    assert _classify(tech_client, slide, _ids(slide, "odd.png"), "smudge").status_code == 200
    assert _sign(tech_client, slide, password=TEST_PASSWORD).json()["version"] == 2
    v1, v2 = ReportVersion.objects.filter(batch=slide).order_by("number")
    assert v1.snapshot["non_wbc"][0]["key"] == "platelet" and v2.snapshot["non_wbc"][0]["key"] == "smudge"
    assert v2.snapshot["amendment_reason"] == "the odd cell is a smudge cell"
    old = tech_client.get(reverse("reports:report_print", args=[slide.uid]), {"version": 1}).text
    new = tech_client.get(reverse("reports:report_print", args=[slide.uid])).text
    assert "Platelet" in old and "Smudge" not in old
    assert "Smudge" in new and "the odd cell is a smudge cell" in new
    assert slide_state(slide).state == FINAL


def test_form_posts_redirect_or_show_the_reason(tech_client, slide):
    refused = tech_client.post(reverse("reports:review_sign", args=[slide.uid]), {"password": TEST_PASSWORD})
    assert refused.status_code == 400 and "still to review" in refused.text
    _review_all(tech_client, slide)
    signed = tech_client.post(reverse("reports:review_sign", args=[slide.uid]), {"password": TEST_PASSWORD})
    assert signed.status_code == 302 and signed["Location"] == reverse("reports:review", args=[slide.uid])


ENDPOINTS = [
    ("get", "reports:review"),
    ("get", "reports:review_state"),
    ("post", "reports:review_classify"),
    ("post", "reports:review_sign"),
    ("post", "reports:review_countersign"),
    ("post", "reports:review_amend"),
    ("get", "reports:report_print"),
    ("post", "reports:wbc_count"),
    ("get", "reports:slide_history"),
    ("get", "reports:slide_history_csv"),
]


@pytest.mark.parametrize(("method", "name"), ENDPOINTS)
def test_another_labs_slide_is_a_404_everywhere(client, slide, outsider, method, name):
    client.force_login(outsider)
    response = getattr(client, method)(reverse(name, args=[slide.uid]))
    assert response.status_code == 404


def test_another_labs_thumbnail_is_a_404(client, slide, outsider):
    client.force_login(outsider)
    item = slide.items.first()
    assert client.get(reverse("reports:cell_thumb", args=[slide.uid, item.pk])).status_code == 404


def test_lab_settings_are_each_labs_own(client, lab_a, lab_b):
    """The settings page has no id to guess: it always shows and saves the caller's own laboratory."""
    admin_b = _member(lab_b, "admin_b", "Model admin")
    client.force_login(admin_b)
    page = client.get(reverse("accounts:lab_settings")).text
    assert "Lab B" in page and "Lab A" not in page
    before = LabSettings.for_lab(lab_a.pk).count_target
    data = {
        "count_target": "200",
        "out_of_scope_limit": "0.3",
        **{
            f"{n}_{b}": v
            for n, (lo, hi) in LabSettings().reference_ranges.items()
            for b, v in (("low", lo), ("high", hi))
        },
        "categories-TOTAL_FORMS": "0",
        "categories-INITIAL_FORMS": "0",
    }
    assert client.post(reverse("accounts:lab_settings"), data).status_code == 302
    assert LabSettings.for_lab(lab_b.pk).count_target == 200
    assert LabSettings.for_lab(lab_a.pk).count_target == before


def test_bad_lab_settings_are_refused_and_nothing_is_saved(client, lab_a, supervisor):
    client.force_login(supervisor)
    data = {
        "count_target": "200",
        "out_of_scope_limit": "0.3",
        **{
            f"{n}_{b}": v
            for n, (lo, hi) in LabSettings().reference_ranges.items()
            for b, v in (("low", lo), ("high", hi))
        },
        "neutrophil_low": "70",  # above its high end (60)
        "categories-TOTAL_FORMS": "1",
        "categories-INITIAL_FORMS": "0",
        "categories-0-key": "blast",
        "categories-0-label": "Blast",
        "categories-0-hotkey": "3",  # a white-cell class's key
        "categories-0-position": "9",
    }
    response = client.post(reverse("accounts:lab_settings"), data)
    assert response.status_code == 400
    assert "ends below its start" in response.text and "Keys 1–5 are the five white-cell classes" in response.text
    assert LabSettings.for_lab(lab_a.pk).count_target == 100
    assert not lab_a.cell_categories.filter(key="blast").exists()
