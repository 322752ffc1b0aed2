"""The per-lab default model: chosen by a Model admin on the models page; the API and batches sent without a model
use it, never a user's remembered web dropdown choice (which stays on that user's web pages)."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from accounts.models import ApiToken
from classifier.models import Prediction
from reports.models import Batch
from tests.conftest import build_tiny_model, image_bytes
from tests.factories import ClassifierModelFactory


@pytest.fixture
def second_record(models_dir, db):
    """A second usable model (another tiny network) for the browser to pick."""
    build_tiny_model(models_dir / "other.keras", seed=7)
    return ClassifierModelFactory(name="Other tiny", model_file=models_dir / "other.keras")


@pytest.fixture
def api(technologist) -> APIClient:
    _token, key = ApiToken.issue(technologist, "LIS")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def _classify_in_browser(client, record) -> Prediction:
    upload = SimpleUploadedFile("cell.png", image_bytes(), content_type="image/png")
    response = client.post(reverse("classifier:classify"), {"image": upload, "model": record.pk})
    assert response.status_code == 302, response.content[:300]
    return Prediction.objects.latest("id")


def test_a_browser_choice_does_not_change_the_api_default(
    tech_client, technologist, model_admin, lab_a, tiny_record, second_record, api
):
    client = Client()  # the model admin's browser (tech_client is the technologist's)
    client.force_login(model_admin)
    response = client.post(reverse("classifier:model_lab_default", args=[tiny_record.pk]))
    assert response.status_code == 302
    lab_a.refresh_from_db()
    assert lab_a.default_model == tiny_record
    page = client.get(reverse("classifier:models")).content.decode()
    assert "lab default" in page and "Make lab default" in page  # offered for the other model

    # the technologist picks the other model in the browser: remembered for their web pages only
    assert _classify_in_browser(tech_client, second_record).model == second_record
    technologist.refresh_from_db()
    assert technologist.default_model == second_record

    # the LIS sends no model=: it gets the lab's default, for single images and for batches
    upload = SimpleUploadedFile("cell.png", image_bytes(), content_type="image/png")
    single = api.post(reverse("api:prediction-list"), {"file": upload}, format="multipart")
    assert single.status_code == 201, single.content
    assert single.json()["model"]["id"] == tiny_record.pk
    batch_upload = SimpleUploadedFile("a.png", image_bytes(), content_type="image/png")
    submitted = api.post(
        reverse("api:batch-list"), {"files": [batch_upload], "external_id": "ACC-1"}, format="multipart"
    )
    assert submitted.status_code == 202, submitted.content
    assert Batch.objects.get(external_id="ACC-1").model == tiny_record
    assert api.get(reverse("api:me")).json()["default_model"]["id"] == tiny_record.pk


def test_only_model_admins_set_the_lab_default_and_only_to_their_models(
    client, tech_client, model_admin, lab_a, lab_b, tiny_record, second_record
):
    assert tech_client.post(reverse("classifier:model_lab_default", args=[tiny_record.pk])).status_code == 403
    lab_a.refresh_from_db()
    assert lab_a.default_model is None
    second_record.laboratory = lab_b  # another lab's own model
    second_record.save(update_fields=["laboratory"])
    client.force_login(model_admin)
    assert client.post(reverse("classifier:model_lab_default", args=[second_record.pk])).status_code == 404
    assert client.get(reverse("classifier:model_lab_default", args=[tiny_record.pk])).status_code == 405
    lab_a.refresh_from_db()
    assert lab_a.default_model is None


def test_without_a_lab_default_the_api_ignores_the_browser_choice(
    tech_client, technologist, tiny_record, second_record, api
):
    first_usable = api.get(reverse("api:me")).json()["default_model"]["id"]
    other = second_record if first_usable == tiny_record.pk else tiny_record
    _classify_in_browser(tech_client, other)
    technologist.refresh_from_db()
    assert technologist.default_model == other
    assert api.get(reverse("api:me")).json()["default_model"]["id"] == first_usable
    upload = SimpleUploadedFile("cell.png", image_bytes(), content_type="image/png")
    assert api.post(reverse("api:prediction-list"), {"file": upload}).json()["model"]["id"] == first_usable


def test_an_inactive_lab_default_falls_back_to_a_usable_model(
    client, model_admin, lab_a, tiny_record, second_record, api
):
    lab_a.default_model = second_record
    lab_a.save(update_fields=["default_model"])
    second_record.is_active = False
    second_record.save(update_fields=["is_active"])
    assert api.get(reverse("api:me")).json()["default_model"]["id"] == tiny_record.pk
