"""The audit trail: one append-only row per reclassification, sign-off, countersign, amendment, lab setting change,
model (de)activation and token creation/revocation, with the acting user; the admin shows them read-only, and on
PostgreSQL a trigger refuses any UPDATE or DELETE of the historical tables."""

import csv
import io
import json

import pytest
from django.contrib.auth.models import Group
from django.db import DatabaseError, connection, transaction
from django.urls import reverse

from accounts.models import ApiToken, LabSettings
from audit.models import HISTORICAL_MODELS
from reports.models import CellVerification, ReportVersion
from tests.conftest import make_known_batch
from tests.factories import TEST_PASSWORD, ClassifierModelFactory, UserFactory

ROWS = [("n1.png", 4, 0.99, False), ("low.png", 2, 0.60, False)]


@pytest.fixture
def slide(technologist, tiny_record):
    return make_known_batch(technologist, tiny_record, ROWS)


@pytest.fixture
def supervisor(lab_a):
    user = UserFactory(username="super_a", laboratory=lab_a)
    user.groups.add(Group.objects.get(name="Supervisor"))
    return user


def _cell(slide, name):
    return slide.items.get(original_filename=name).pk


def _classify(client, slide, cells, new_class):
    url = reverse("reports:review_classify", args=[slide.uid])
    response = client.post(url, json.dumps({"cells": cells, "class": new_class}), content_type="application/json")
    assert response.status_code == 200, response.content
    return response


def _post(client, slide, name, **data):
    response = client.post(reverse(f"reports:{name}", args=[slide.uid]), data, HTTP_ACCEPT="application/json")
    assert response.status_code == 200, response.content
    return response


def test_every_review_action_is_one_row_with_the_user(tech_client, slide, technologist, lab_a, client, supervisor):
    LabSettings.objects.update_or_create(laboratory=lab_a, defaults={"two_person_signoff": True})
    _classify(tech_client, slide, [_cell(slide, "low.png")], "monocyte")
    _classify(tech_client, slide, [_cell(slide, "low.png")], "lymphocyte")
    _post(tech_client, slide, "review_sign", password=TEST_PASSWORD)
    client.force_login(supervisor)
    _post(client, slide, "review_countersign", password=TEST_PASSWORD)
    _post(client, slide, "review_amend", reason="typo in the lymphocyte")
    _classify(client, slide, [_cell(slide, "low.png")], None)

    cells = list(CellVerification.history.order_by("history_date", "history_id"))
    assert [(r.history_type, r.verified_class, r.history_user_id) for r in cells] == [
        ("+", "monocyte", technologist.pk),
        ("~", "lymphocyte", technologist.pk),
        ("-", "lymphocyte", supervisor.pk),
    ]
    versions = list(ReportVersion.history.order_by("history_date", "history_id"))
    assert [(r.number, r.history_change_reason, r.history_user_id) for r in versions] == [
        (1, "signed v1", technologist.pk),
        (1, "countersigned v1", supervisor.pk),
        (2, "amendment opened v2: typo in the lymphocyte", supervisor.pk),
    ]

    page = tech_client.get(reverse("reports:slide_history", args=[slide.uid])).text
    assert "reclassified monocyte -&gt; lymphocyte" in page and "countersigned v1" in page
    rows = list(csv.reader(io.StringIO(tech_client.get(reverse("reports:slide_history_csv", args=[slide.uid])).text)))
    assert rows[0] == ["time", "user", "action", "object", "before", "after"]
    assert rows[1][1:] == [
        "tech_a",
        "reclassified lymphocyte -> monocyte",
        "cell low.png",
        "AI: lymphocyte",
        "monocyte",
    ]
    assert rows[2][4:] == ["monocyte", "lymphocyte"]
    assert [r[2] for r in rows[1:]] == [
        "reclassified lymphocyte -> monocyte",
        "reclassified monocyte -> lymphocyte",
        "signed v1",
        "countersigned v1",
        "amendment opened v2: typo in the lymphocyte",
        "verification removed",
    ]
    assert rows[-1][1] == "super_a" and rows[-1][5] == "AI: lymphocyte"


def test_lab_settings_change_is_audited(client, model_admin, lab_a):
    client.force_login(model_admin)
    page = client.get(reverse("accounts:lab_settings"))
    assert page.status_code == 200
    data = {
        "count_target": "200",
        "two_person_signoff": "on",
        "out_of_scope_limit": "0.25",
        **{
            f"{n}_{b}": v
            for n, (lo, hi) in LabSettings().reference_ranges.items()
            for b, v in (("low", lo), ("high", hi))
        },
        "neutrophil_low": "45",
        "categories-TOTAL_FORMS": "0",
        "categories-INITIAL_FORMS": "0",
    }
    response = client.post(reverse("accounts:lab_settings"), data)
    assert response.status_code == 302
    row = LabSettings.objects.get(laboratory=lab_a)
    assert row.count_target == 200 and row.two_person_signoff and row.reference_ranges["neutrophil"] == [45.0, 60.0]
    last = row.history.latest()
    assert last.history_user_id == model_admin.pk and last.history_change_reason == "lab settings changed"
    assert last.count_target == 200


def test_a_technologist_cannot_change_lab_settings(tech_client):
    assert tech_client.get(reverse("accounts:lab_settings")).status_code == 403


def test_model_switch_and_token_life_are_audited(client, model_admin, lab_a, models_dir):
    record = ClassifierModelFactory(is_bundled=False, laboratory=lab_a, model_file=models_dir / "tiny.keras")
    client.force_login(model_admin)
    assert client.post(reverse("classifier:model_toggle", args=[record.pk])).status_code == 302
    last = record.history.latest()
    assert (last.is_active, last.history_user_id, last.history_change_reason) == (
        False,
        model_admin.pk,
        "model deactivated",
    )

    response = client.post(reverse("accounts:tokens"), {"action": "create", "name": "LIS"})
    assert response.status_code == 201
    token = ApiToken.objects.get(user=model_admin)
    assert client.post(reverse("accounts:tokens"), {"action": "revoke", "token": token.pk}).status_code == 302
    rows = list(token.history.order_by("history_date", "history_id"))
    assert [(r.history_type, r.history_user_id, r.revoked_at is None) for r in rows] == [
        ("+", model_admin.pk, True),
        ("~", model_admin.pk, False),
    ]
    assert rows[1].history_change_reason == "token revoked"
    assert not hasattr(rows[0], "digest")  # the audit trail keeps no key material


def test_the_admin_shows_the_trail_read_only_even_to_a_superuser(admin_client, slide, technologist):
    verification = CellVerification(
        item=slide.items.get(original_filename="low.png"), verified_class="monocyte", verified_by=technologist
    )
    from django.utils import timezone

    verification.verified_at = timezone.now()
    verification._history_user = technologist
    verification.save()
    row = CellVerification.history.get()
    opts = row._meta
    assert admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")).status_code == 200
    change = admin_client.post(
        reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[row.pk]), {"verified_class": "basophil"}
    )
    assert change.status_code == 403
    delete = admin_client.post(
        reverse(f"admin:{opts.app_label}_{opts.model_name}_delete", args=[row.pk]), {"post": "yes"}
    )
    assert delete.status_code == 403
    assert admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_add")).status_code == 403
    row.refresh_from_db()
    assert row.verified_class == "monocyte"


def test_a_signed_slides_verifications_are_read_only_in_the_admin(admin_client, tech_client, slide):
    _classify(tech_client, slide, [_cell(slide, "low.png")], "monocyte")
    verification = CellVerification.objects.get()
    url = reverse("admin:reports_cellverification_change", args=[verification.pk])
    before = admin_client.post(url, {"verified_class": "basophil"})
    assert before.status_code == 302  # unsigned: an administrator may correct it (audited)
    _classify(tech_client, slide, [_cell(slide, "low.png")], "monocyte")
    _post(tech_client, slide, "review_sign", password=TEST_PASSWORD)
    assert admin_client.post(url, {"verified_class": "eosinophil"}).status_code == 403
    assert (
        admin_client.post(
            reverse("admin:reports_cellverification_delete", args=[verification.pk]), {"post": "yes"}
        ).status_code
        == 403
    )
    version = ReportVersion.objects.get()
    assert (
        admin_client.post(reverse("admin:reports_reportversion_change", args=[version.pk]), {"number": "7"}).status_code
        == 403
    )
    verification.refresh_from_db()
    assert verification.verified_class == "monocyte"


@pytest.mark.postgresql
@pytest.mark.parametrize("statement", ["UPDATE {table} SET history_change_reason = 'edited'", "DELETE FROM {table}"])
def test_postgresql_refuses_raw_update_and_delete_of_the_trail(tech_client, slide, statement):
    _classify(tech_client, slide, [_cell(slide, "low.png")], "monocyte")
    for model in HISTORICAL_MODELS:
        table = model._meta.db_table
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(statement.format(table=table))
    assert CellVerification.history.count() == 1


def test_another_labs_review_rows_are_a_404_in_the_admin(client, tech_client, slide, lab_b):
    _classify(tech_client, slide, [_cell(slide, "low.png")], "monocyte")
    _post(tech_client, slide, "review_sign", password=TEST_PASSWORD)
    staff = UserFactory(username="staff_b", laboratory=lab_b, is_staff=True)
    from django.contrib.auth.models import Permission

    staff.user_permissions.set(
        Permission.objects.filter(
            codename__in=["view_cellverification", "view_reportversion", "view_historicalcellverification"]
        )
    )
    client.force_login(staff)
    verification, version = CellVerification.objects.get(), ReportVersion.objects.get()
    history_row = CellVerification.history.first()
    for name, pk in [
        ("admin:reports_cellverification_change", verification.pk),
        ("admin:reports_reportversion_change", version.pk),
        ("admin:audit_historicalcellverification_change", history_row.pk),
    ]:
        assert client.get(reverse(name, args=[pk])).status_code == 404
    listing = client.get(reverse("admin:reports_cellverification_changelist"))
    assert listing.status_code == 200 and "low.png" not in listing.text


def test_the_labs_default_model_change_is_audited(client, model_admin, lab_a, tiny_record):
    client.force_login(model_admin)
    assert client.post(reverse("classifier:model_lab_default", args=[tiny_record.pk])).status_code == 302
    last = lab_a.history.latest()
    assert (last.default_model_id, last.history_user_id) == (tiny_record.pk, model_admin.pk)
    assert last.history_change_reason.startswith("lab default model")
