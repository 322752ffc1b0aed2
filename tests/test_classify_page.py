import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from PIL import Image

from classifier.models import Prediction
from tests.conftest import image_bytes


def _post(client, record, name, data, content_type="image/png"):
    upload = SimpleUploadedFile(name, data, content_type=content_type)
    return client.post(reverse("classifier:classify"), {"image": upload, "model": record.pk})


def _stored_files(settings):
    return [p for p in settings.MEDIA_ROOT.rglob("*") if p.is_file()]


def test_classify_page_lists_models_and_empty_state(tech_client, tiny_record):
    response = tech_client.get(reverse("classifier:classify"))
    assert response.status_code == 200
    assert "Tiny CNN" in response.text
    assert "No images classified yet" in response.text


def test_upload_is_classified_stored_and_shown(tech_client, tiny_record, technologist):
    response = _post(tech_client, tiny_record, "cell.png", image_bytes())
    prediction = Prediction.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("classifier:prediction", args=[prediction.uid])
    assert prediction.user == technologist and prediction.laboratory == technologist.laboratory
    assert prediction.model == tiny_record and prediction.original_filename == "cell.png"
    assert len(prediction.probabilities) == 5 and abs(sum(prediction.probabilities) - 1) < 1e-4
    assert prediction.processing_ms > 0
    page = tech_client.get(response["Location"])
    assert page.status_code == 200
    assert prediction.predicted_class.capitalize() in page.text
    for name in tiny_record.class_names:
        assert name in page.text
    image = tech_client.get(reverse("classifier:prediction_image", args=[prediction.uid]))
    assert image.status_code == 200 and image["Content-Type"] == "image/png"


def test_saliency_overlay_is_made_once_and_kept(tech_client, prediction):
    url = reverse("classifier:saliency", args=[prediction.uid, "gradcam"])
    first = tech_client.get(url)
    assert first.status_code == 200 and first["Content-Type"] == "image/webp"
    png = b"".join(first.streaming_content)
    assert Image.open(io.BytesIO(png)).size == (prediction.width, prediction.height)
    prediction.refresh_from_db()
    assert prediction.gradcam.name
    second = tech_client.get(url)
    assert b"".join(second.streaming_content) == png


def test_input_gradient_map_is_selectable(tech_client, prediction):
    page = tech_client.get(reverse("classifier:prediction", args=[prediction.uid]) + "?saliency=gradient")
    assert reverse("classifier:saliency", args=[prediction.uid, "gradient"]) in page.text
    response = tech_client.get(reverse("classifier:saliency", args=[prediction.uid, "gradient"]))
    assert response.status_code == 200


def test_unknown_saliency_method_is_404(tech_client, prediction):
    assert tech_client.get(reverse("classifier:saliency", args=[prediction.uid, "lime"])).status_code == 404


def _bomb():
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def _truncated_jpeg():
    data = image_bytes(size=(300, 300), fmt="JPEG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("notes.jpg", b"plain text with a .jpg name", "not a readable image"),
        ("cell.gif", image_bytes(fmt="GIF"), "unsupported image type"),
        ("half.jpg", _truncated_jpeg(), "damaged or truncated"),
        ("bomb.png", _bomb(), "decompression bomb"),
        ("empty.png", b"", "empty"),
    ],
)
def test_bad_upload_shows_alert_naming_the_file_and_stores_nothing(
    tech_client, tiny_record, settings, name, data, reason
):
    response = _post(tech_client, tiny_record, name, data)
    assert response.status_code == 400
    assert 'role="alert"' in response.text
    assert name in response.text and reason in response.text
    assert Prediction.objects.count() == 0
    assert _stored_files(settings) == []


def test_file_over_the_byte_cap_is_refused(tech_client, tiny_record, settings):
    settings.WBC_MAX_IMAGE_BYTES = 1000
    response = _post(tech_client, tiny_record, "big.png", image_bytes(size=(200, 200)))
    assert response.status_code == 400 and "big.png: the file is larger than" in response.text
    assert Prediction.objects.count() == 0


def test_no_file_is_a_clear_message(tech_client, tiny_record):
    response = tech_client.post(reverse("classifier:classify"), {"model": tiny_record.pk})
    assert response.status_code == 400
    assert "No file was chosen" in response.text
    assert Prediction.objects.count() == 0


def test_broken_model_file_gives_a_clear_page_not_a_500(tech_client, tiny_record, models_dir, settings):
    (models_dir / "tiny.keras").unlink()
    response = _post(tech_client, tiny_record, "cell.png", image_bytes())
    assert response.status_code == 503
    assert "The model cannot be used right now" in response.text and "missing" in response.text
    assert Prediction.objects.count() == 0 and _stored_files(settings) == []


def test_inactive_model_cannot_be_chosen(tech_client, tiny_record):
    tiny_record.is_active = False
    tiny_record.save()
    response = _post(tech_client, tiny_record, "cell.png", image_bytes())
    assert response.status_code == 400 and Prediction.objects.count() == 0


def test_history_lists_the_labs_predictions(tech_client, prediction):
    response = tech_client.get(reverse("classifier:history"))
    assert response.status_code == 200 and prediction.original_filename in response.text
