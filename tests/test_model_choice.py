"""The model and normalisation dropdowns, and lab models uploaded through the page."""

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from classifier.models import ClassifierModel, Prediction
from tests.conftest import TINY_SIZE, build_tiny_model, image_bytes
from wbc_ml.checksums import file_sha256


@pytest.fixture
def second_record(models_dir, db):
    build_tiny_model(models_dir / "other.keras", seed=7)
    return ClassifierModel.objects.create(
        name="Other tiny",
        version="1",
        architecture="tiny",
        file_name="other.keras",
        sha256=file_sha256(models_dir / "other.keras"),
        input_height=TINY_SIZE[0],
        input_width=TINY_SIZE[1],
        normalization={"method": "zscore", "mean": [127.5] * 3, "std": [127.5] * 3},
        class_names=["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"],
        is_bundled=True,
        parameters=1234,
        test_accuracy=0.912,
    )


def _classify(client, record, **extra):
    upload = SimpleUploadedFile("cell.png", image_bytes(), content_type="image/png")
    response = client.post(reverse("classifier:classify"), {"image": upload, "model": record.pk, **extra})
    assert response.status_code == 302, response.content[:500]
    return Prediction.objects.latest("id")


def test_dropdown_lists_models_with_size_parameters_and_accuracy(tech_client, tiny_record, second_record):
    page = tech_client.get(reverse("classifier:classify")).text
    assert "Other tiny · 32×32 · 0.0M params · test acc 91.2%" in page
    assert 'data-normalization="{&quot;method&quot;: &quot;zscore&quot;' in page


def test_switching_the_model_really_changes_the_model_used(tech_client, tiny_record, second_record):
    first = _classify(tech_client, tiny_record)
    second = _classify(tech_client, second_record)
    assert first.model == tiny_record and second.model == second_record
    assert second.normalization == second_record.normalization
    assert not np.allclose(first.probabilities, second.probabilities, atol=1e-4)


def test_last_model_used_becomes_the_users_default(tech_client, technologist, tiny_record, second_record):
    _classify(tech_client, second_record)
    technologist.refresh_from_db()
    assert technologist.default_model == second_record
    page = tech_client.get(reverse("classifier:classify")).text
    assert f'<option value="{second_record.pk}" selected data-normalization' in page


def test_choosing_another_normalisation_is_applied_and_recorded(tech_client, tiny_record):
    own = _classify(tech_client, tiny_record)
    other = _classify(
        tech_client, tiny_record, normalization="zscore", norm_mean="100, 100, 100", norm_std="50, 50, 50"
    )
    assert own.normalization == {"method": "scale01"}
    assert other.normalization == {"method": "zscore", "mean": [100.0, 100.0, 100.0], "std": [50.0, 50.0, 50.0]}
    assert not np.allclose(own.probabilities, other.probabilities, atol=1e-4)
    page = tech_client.get(reverse("classifier:prediction", args=[other.uid])).text
    assert "not the model's own" in page


def test_zscore_defaults_come_from_the_models_card(tech_client, second_record):
    prediction = _classify(tech_client, second_record, normalization="zscore")
    assert prediction.normalization == {"method": "zscore", "mean": [127.5] * 3, "std": [127.5] * 3}


@pytest.mark.parametrize(
    ("mean", "std", "message"),
    [
        ("1, 2", "1, 1, 1", "exactly three"),
        ("a, b, c", "1, 1, 1", "three numbers"),
        ("0, 0, 0", "1, 0, 1", "value must be between 0.001 and 1000"),
    ],
)
def test_bad_zscore_numbers_are_refused(tech_client, tiny_record, mean, std, message):
    upload = SimpleUploadedFile("cell.png", image_bytes(), content_type="image/png")
    response = tech_client.post(
        reverse("classifier:classify"),
        {"image": upload, "model": tiny_record.pk, "normalization": "zscore", "norm_mean": mean, "norm_std": std},
    )
    assert response.status_code == 400 and message in response.text
    assert Prediction.objects.count() == 0


def test_same_file_with_another_normalisation_shares_the_loaded_model(tiny_record):
    from wbc_ml.inference import get_classifier

    a = get_classifier(tiny_record.spec())
    b = get_classifier(tiny_record.spec({"method": "zscore", "mean": [1, 2, 3], "std": [4, 5, 6]}))
    assert a.loaded is b.loaded and a.normalization != b.normalization


# --- lab models uploaded through the page ------------------------------------------------------


@pytest.fixture
def model_admin_client(client, model_admin, settings, tmp_path):
    settings.WBC_CUSTOM_MODELS_DIR = tmp_path / "custom"
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    client.force_login(model_admin)
    return client


def _upload_model(client, path, name="Lab CNN", **extra):
    data = {
        "name": name,
        "class_order": "basophil, eosinophil, lymphocyte, monocyte, neutrophil",
        "normalization": "scale01",
        "file": SimpleUploadedFile(path.name, path.read_bytes()),
        **extra,
    }
    return client.post(reverse("classifier:model_upload"), data)


def test_valid_keras3_upload_is_registered_for_the_lab_only_and_classifies(
    model_admin_client, model_admin, tmp_path, tiny_record, outsider
):
    path = tmp_path / "mine.keras"
    build_tiny_model(path, seed=3)
    response = _upload_model(model_admin_client, path)
    assert response.status_code == 302, response.content[:800]
    record = ClassifierModel.objects.get(name="Lab CNN")
    assert record.laboratory == model_admin.laboratory and not record.is_bundled and record.is_active
    assert record.sha256 == file_sha256(path) and record.input_size == TINY_SIZE
    assert record.path.is_file()
    prediction = _classify(model_admin_client, record)
    assert prediction.model == record and abs(sum(prediction.probabilities) - 1) < 1e-4
    # another lab neither sees nor can use it
    client = Client()
    client.force_login(outsider)
    assert "Lab CNN" not in client.get(reverse("classifier:classify")).text
    upload = SimpleUploadedFile("cell.png", image_bytes(), content_type="image/png")
    refused = client.post(reverse("classifier:classify"), {"image": upload, "model": record.pk})
    assert refused.status_code == 400 and not Prediction.objects.filter(user=outsider).exists()


def test_valid_keras2_style_h5_upload_classifies(model_admin_client, tmp_path):
    path = tmp_path / "legacy.h5"
    build_tiny_model(path, seed=4)
    assert _upload_model(model_admin_client, path, name="Legacy").status_code == 302
    record = ClassifierModel.objects.get(name="Legacy")
    assert record.architecture == "custom (h5)"
    assert _classify(model_admin_client, record).model == record


def test_unsafe_model_is_refused_with_its_reason_and_nothing_is_stored(model_admin_client, tmp_path, settings):
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda t: t * 2, name="sneaky")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x)).save(path)
    response = _upload_model(model_admin_client, path, name="Sneaky")
    assert response.status_code == 400 and "Lambda layer" in response.text and "lambda.keras" in response.text
    assert not ClassifierModel.objects.filter(name="Sneaky").exists()
    assert [p for p in settings.WBC_CUSTOM_MODELS_DIR.rglob("*")] == []


def test_a_lambda_in_a_nested_models_compile_config_is_refused_and_nothing_is_stored(
    model_admin_client, tmp_path, settings
):
    import keras

    from tests.test_model_validation import nested_compiled_model, replace_nested_loss, serialised_lambda

    plain, sneaky = tmp_path / "plain.keras", tmp_path / "backbone.keras"
    nested_compiled_model(keras).save(plain)
    replace_nested_loss(plain, sneaky, serialised_lambda(keras))
    response = _upload_model(model_admin_client, sneaky, name="Nested sneaky")
    assert response.status_code == 400
    assert "Nested model &#x27;backbone&#x27; (its saved compile settings) contains serialised Python code" in (
        response.text
    )
    assert not ClassifierModel.objects.filter(name="Nested sneaky").exists()
    assert [p for p in settings.WBC_CUSTOM_MODELS_DIR.rglob("*")] == []
    assert not settings.WBC_ONNX_DIR.exists() or [p for p in settings.WBC_ONNX_DIR.rglob("*")] == []


def test_model_file_over_the_cap_is_refused(model_admin_client, tmp_path, settings):
    settings.WBC_MAX_MODEL_BYTES = 1000
    path = tmp_path / "big.keras"
    build_tiny_model(path)
    response = _upload_model(model_admin_client, path, name="Big")
    assert response.status_code == 400 and "limit for model files" in response.text
    assert not ClassifierModel.objects.filter(name="Big").exists()


def test_wrong_class_order_is_refused(model_admin_client, tmp_path):
    path = tmp_path / "m.keras"
    build_tiny_model(path)
    response = _upload_model(model_admin_client, path, class_order="basophil, platelet")
    assert response.status_code == 400 and "Unknown class(es): platelet" in response.text


def test_technologist_cannot_upload_models(tech_client):
    assert tech_client.get(reverse("classifier:model_upload")).status_code == 403


def test_lab_model_can_be_deactivated_and_then_cannot_be_chosen(model_admin_client, tmp_path, outsider):
    path = tmp_path / "mine.keras"
    build_tiny_model(path, seed=5)
    _upload_model(model_admin_client, path, name="Switchable")
    record = ClassifierModel.objects.get(name="Switchable")
    client = Client()
    client.force_login(outsider)
    assert client.post(reverse("classifier:model_toggle", args=[record.pk])).status_code in (403, 404)
    response = model_admin_client.post(reverse("classifier:model_toggle", args=[record.pk]))
    assert response.status_code == 302
    record.refresh_from_db()
    assert not record.is_active
    model_admin_client.get(reverse("classifier:models"))  # shows (and so clears) the pending messages
    assert "Switchable" not in model_admin_client.get(reverse("classifier:classify")).text


def test_admin_add_goes_through_the_validated_upload(model_admin_client, model_admin):
    model_admin.is_staff = True
    model_admin.save()
    response = model_admin_client.get(reverse("admin:classifier_classifiermodel_add"))
    assert response.status_code == 302 and response["Location"] == reverse("classifier:model_upload")


def test_models_page_lists_bundled_and_lab_models(tech_client, tiny_record):
    page = tech_client.get(reverse("classifier:models")).text
    assert "Tiny CNN" in page and "0–1 scaling" in page


def test_models_page_shows_how_often_each_model_sends_cells_to_review(tech_client, tiny_record, second_record):
    second_record.card = {"ood": {"non_wbc_flagged_share": 0.9487, "wbc_flagged_share": 0.0237}}
    second_record.save(update_fields=["card"])
    page = tech_client.get(reverse("classifier:models")).text
    assert "Review flags: non-WBC / WBC" in page
    assert "94.9% / 2.4%" in page
    assert tiny_record.review_rates is None  # no card numbers: the page shows a dash, not a made-up rate
