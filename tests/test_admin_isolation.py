"""The Django admin keeps labs apart: a staff Model admin of lab A (who may also manage lab A's users and tokens)
never sees another lab's rows, cannot change the shared (bundled) models, and cannot move anything between labs
or edit the file fields that decide which file is served."""

import pytest
from django import forms
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.test import RequestFactory
from django.urls import reverse

from accounts.models import ApiToken, User
from classifier.models import ClassifierModel, Prediction
from reports.models import EvaluationRun
from tests.conftest import make_known_batch

LAB_ADMIN_PERMISSIONS = [
    "view_user",
    "change_user",
    "add_user",
    "view_apitoken",
    "change_apitoken",
    "add_apitoken",
    "delete_apitoken",
    "view_evaluationrun",
]


@pytest.fixture
def staff_admin(model_admin):
    """Lab A's staff Model admin, who also manages lab A's users and tokens (not a superuser)."""
    model_admin.is_staff = True
    model_admin.save()
    model_admin.user_permissions.add(*Permission.objects.filter(codename__in=LAB_ADMIN_PERMISSIONS))
    return User.objects.get(pk=model_admin.pk)  # fresh permission cache


@pytest.fixture
def admin_client(client, staff_admin):
    client.force_login(staff_admin)
    return client


def _lab_model(lab, name):
    return ClassifierModel.objects.create(
        name=name,
        architecture="custom (keras)",
        file_name=f"lab{lab.pk}/{name}.keras",
        sha256="1" * 64,
        input_height=32,
        input_width=32,
        normalization={"method": "scale01"},
        class_names=["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"],
        laboratory=lab,
        onnx_file_name=f"lab{lab.pk}/{name}-f2.onnx",
        onnx_sha256="2" * 64,
    )


@pytest.fixture
def other_lab(lab_b, outsider, tiny_record):
    """Lab B's own model, prediction, user, token and evaluation run."""
    model = _lab_model(lab_b, "LabBSecretModel")
    batch = make_known_batch(outsider, tiny_record, [("labB-cell.png", 0, 0.95, False)], name="Lab B slide")
    prediction = Prediction.objects.get(batch_item__batch=batch)
    token = ApiToken(user=outsider, name="LabB LIS token")
    token.assign_new_key()
    token.save()
    run = EvaluationRun.objects.create(
        laboratory=lab_b,
        batch=batch,
        model=tiny_record,
        model_version="1",
        threshold=0.85,
        user=outsider,
        labels_sha256="3" * 64,
        labels_filename="labB-truth.csv",
        n_labelled=1,
    )
    return {"model": model, "prediction": prediction, "user": outsider, "token": token, "run": run}


def _url(obj, view="change"):
    opts = obj._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=[obj.pk])


def _changelist(model):
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


def test_another_labs_rows_are_404_in_change_delete_and_history_pages(admin_client, other_lab):
    for key in ("model", "prediction", "user", "token", "run"):
        for view in ("change", "delete", "history"):
            response = admin_client.get(_url(other_lab[key], view))
            assert response.status_code == 404, (key, view, response.status_code)
    password = reverse("admin:auth_user_password_change", args=[other_lab["user"].pk])
    assert admin_client.get(password).status_code == 404


def test_another_labs_rows_and_lab_name_are_absent_from_changelists(admin_client, other_lab, technologist):
    pages = {
        ClassifierModel: "LabBSecretModel",
        Prediction: "labB-cell.png",
        User: "tech_b",
        ApiToken: "LabB LIS token",
        EvaluationRun: "labB-truth.csv",
    }
    for model, secret in pages.items():
        response = admin_client.get(_changelist(model))
        assert response.status_code == 200, model
        assert secret not in response.text, model
        assert "Lab B" not in response.text, model  # not even in a filter
    assert "tech_a" in admin_client.get(_changelist(User)).text  # the check above can fail: own rows are listed


def test_a_superuser_without_a_lab_is_invisible_to_a_lab_admin(admin_client, db):
    root = User.objects.create_superuser("root", password="a-long-test-password")  # no laboratory
    assert admin_client.get(_url(root)).status_code == 404
    assert ">root<" not in admin_client.get(_changelist(User)).text
    form = admin_client.get(reverse("admin:accounts_apitoken_add")).context["adminform"].form
    assert root not in form.fields["user"].queryset  # and no token can be made for it
    response = admin_client.post(reverse("admin:accounts_apitoken_add"), {"user": root.pk, "name": "escalate"})
    assert response.status_code == 200 and not ApiToken.objects.filter(user=root).exists()


def test_shared_bundled_models_cannot_be_changed_deleted_or_deactivated(admin_client, tiny_record):
    assert admin_client.get(_url(tiny_record)).status_code == 200  # visible (every lab uses it), read only
    assert admin_client.post(_url(tiny_record), {"name": "Renamed", "is_active": ""}).status_code == 403
    assert admin_client.get(_url(tiny_record, "delete")).status_code == 403
    assert admin_client.post(_url(tiny_record, "delete"), {"post": "yes"}).status_code == 403
    changelist = _changelist(ClassifierModel)
    admin_client.post(changelist, {"action": "deactivate", admin.helpers.ACTION_CHECKBOX_NAME: [tiny_record.pk]})
    response = admin_client.post(
        changelist, {"action": "delete_selected", "post": "yes", admin.helpers.ACTION_CHECKBOX_NAME: [tiny_record.pk]}
    )
    assert response.status_code in (302, 403)
    tiny_record.refresh_from_db()
    assert tiny_record.is_active and tiny_record.name == "Tiny CNN"


def test_admin_actions_only_touch_the_labs_own_models(admin_client, lab_a, tiny_record):
    own = _lab_model(lab_a, "LabAModel")
    changelist = _changelist(ClassifierModel)
    selected = {admin.helpers.ACTION_CHECKBOX_NAME: [own.pk, tiny_record.pk]}
    response = admin_client.post(changelist, {"action": "deactivate", **selected}, follow=True)
    own.refresh_from_db()
    tiny_record.refresh_from_db()
    assert not own.is_active and tiny_record.is_active
    assert "1 model(s) deactivated" in response.text and "shared" in response.text


def _form_data(form) -> dict:
    """What the browser would post back for an unchanged admin form."""
    data = {}
    for field in form:
        value = field.value()
        if isinstance(field.field, forms.JSONField):
            value = field.field.prepare_value(value)
        if isinstance(field.field, forms.BooleanField):
            if value:
                data[field.html_name] = "on"
            continue
        if value is not None:
            data[field.html_name] = value
    return data


def test_laboratory_and_file_fields_are_read_only(admin_client, lab_a, lab_b):
    own = _lab_model(lab_a, "LabAModel")
    page = admin_client.get(_url(own))
    form = page.context["adminform"].form
    locked = {"laboratory", "file_name", "onnx_file_name", "ood_file_name", "sha256", "onnx_sha256", "ood_sha256"}
    assert not locked & set(form.fields)
    data = _form_data(form) | {
        "name": "Renamed by lab A",
        "laboratory": lab_b.pk,
        "file_name": "../../../etc/passwd",
        "onnx_file_name": "../evil.onnx",
        "ood_file_name": "../evil.npz",
    }
    response = admin_client.post(_url(own), data)
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    own.refresh_from_db()
    assert own.name == "Renamed by lab A"  # the post went through, and only the editable field changed
    assert own.laboratory == lab_a and own.file_name == f"lab{lab_a.pk}/LabAModel.keras"
    assert own.onnx_file_name == f"lab{lab_a.pk}/LabAModel-f2.onnx" and own.ood_file_name == ""


def test_a_lab_admin_cannot_move_a_user_to_another_lab_or_grant_superuser(staff_admin, technologist, lab_a):
    user_admin = admin.site._registry[User]
    request = RequestFactory().get("/")
    request.user = staff_admin
    form_class = user_admin.get_form(request, technologist, change=True)
    assert {"laboratory", "is_superuser", "user_permissions"}.isdisjoint(form_class.base_fields)
    add_form = user_admin.get_form(request, None, change=False)
    assert "laboratory" not in add_form.base_fields


def test_a_user_added_by_a_lab_admin_joins_the_admins_lab(admin_client, lab_a):
    response = admin_client.post(
        reverse("admin:accounts_user_add"),
        {"username": "new_tech", "password1": "Another-long-pass-42", "password2": "Another-long-pass-42"},
    )
    assert response.status_code == 302, response.content[:2000]
    created = User.objects.get(username="new_tech")
    assert created.laboratory == lab_a and not created.is_superuser
