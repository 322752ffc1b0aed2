"""Small fixes a new user asked for, each checked on the page the server really renders."""

import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from classifier.templatetags.wbc import compact_count
from reports.models import Batch
from reports.services import create_evaluation
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from tests.conftest import image_bytes, make_known_batch
from tests.factories import ClassifierModelFactory

pytestmark = pytest.mark.django_db


def _visible_text(html: str) -> str:
    """The page as a reader sees it: no tags, no attributes, no scripts."""
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_favicon_is_served_and_linked(client, tech_client):
    response = client.get("/favicon.ico", follow=True)  # anonymous: browsers ask before anyone logs in
    assert response.status_code == 200
    assert response["Content-Type"] in ("image/x-icon", "image/vnd.microsoft.icon")
    assert b"".join(response.streaming_content)[:4] == b"\x00\x00\x01\x00"  # a real .ico file
    page = tech_client.get(reverse("classifier:classify")).content.decode()
    svg = re.search(r'<link rel="icon" href="([^"]+\.svg)"', page).group(1)
    icon = client.get(svg)
    assert icon.status_code == 200 and b"<svg" in b"".join(icon.streaming_content)


@pytest.mark.parametrize(
    "count, text", [(2264389, "2.26 M"), (421317, "0.42 M"), (8450, "8.45 k"), (512, "512"), (None, "—")]
)
def test_parameter_counts_read_at_a_glance(count, text):
    assert compact_count(count) == text


def test_models_table_shows_compact_parameter_counts_and_a_short_serving_label(tech_client):
    serving = "ONNX Runtime (max |Δp| vs TensorFlow on probe batch: 3.2e-07)"
    ClassifierModelFactory(name="MobileNetV2 (head)", parameters=2264389, onnx_status=serving)
    html = tech_client.get(reverse("classifier:models")).content.decode()
    text = _visible_text(html)
    assert "2.26 M" in text and "2264389" not in text
    assert 'title="2264389 parameters"' in html  # the exact count is one hover away
    assert "ONNX Runtime" in text and "probe batch" not in text and "probe batch" in html  # details on hover
    assert re.search(r'<div class="table-scroll">\s*<table[^>]*id="models-table"', html)


def test_classify_page_has_one_model_and_one_normalisation_dropdown_and_a_preview(tech_client, tiny_record):
    html = tech_client.get(reverse("classifier:classify")).content.decode()
    assert html.count('name="model"') == 1
    assert html.count('name="normalization"') == 1
    assert html.count('id="id_model"') == 1
    assert html.count("<form") == 2  # the classify form and the log-out button
    assert 'id="chosen-preview"' in html
    assert f'formaction="{reverse("classifier:classify_url")}"' in html  # the URL goes through the same fields


def test_a_refused_url_keeps_the_users_model_choice_in_the_single_form(tech_client, tiny_record):
    other = ClassifierModelFactory(name="Second model", model_file=None)
    response = tech_client.post(
        reverse("classifier:classify_url"), {"url": "ftp://example.org/cell.png", "model": other.pk}
    )
    html = response.content.decode()
    assert response.status_code == 400
    assert html.count('name="model"') == 1
    assert re.search(rf'<option value="{other.pk}"[^>]*selected', html)
    assert html.count('id="url-error"') == 1


def test_csv_buttons_wait_until_the_batch_is_finished(tech_client, technologist, tiny_record):
    queued = submit_batch(technologist, [NamedBytes("cell.png", image_bytes())], tiny_record, name="Waiting")
    assert queued.status == Batch.Status.QUEUED
    html = tech_client.get(reverse("reports:batch", args=[queued.uid])).content.decode()
    assert "csv-link" not in html and "Summary CSV" not in html

    done = make_known_batch(technologist, tiny_record, [("n1.png", 4, 0.99, False)])
    html = tech_client.get(reverse("reports:batch", args=[done.uid])).content.decode()
    assert 'id="csv-link"' in html and "Summary CSV" in html


def test_a_refused_model_upload_shows_its_error_once(client, model_admin):
    client.force_login(model_admin)
    data = {
        "name": "Broken",
        "file": SimpleUploadedFile("broken.keras", b"this is not a model file"),
        "class_order": "basophil, eosinophil, lymphocyte, monocyte, neutrophil",
        "normalization": "scale01",
    }
    response = client.post(reverse("classifier:model_upload"), data)
    assert response.status_code == 400
    text = _visible_text(response.content.decode())
    assert text.count("broken.keras:") == 1

    data["file"] = SimpleUploadedFile("model.keras", b"x")
    data["class_order"] = "basophil, platelet"
    text = _visible_text(client.post(reverse("classifier:model_upload"), data).content.decode())
    assert text.count("Unknown class(es): platelet") == 1


def test_normalisation_is_spelt_one_way_on_every_page(client, model_admin, tech_client, tiny_record, prediction):
    client.force_login(model_admin)
    pages = [
        tech_client.get(reverse("classifier:classify")),
        tech_client.get(reverse("reports:batch_new")),
        tech_client.get(reverse("classifier:models")),
        tech_client.get(reverse("classifier:prediction", args=[prediction.uid])),
        client.get(reverse("classifier:model_upload")),
    ]
    for response in pages:
        text = _visible_text(response.content.decode())
        assert response.status_code == 200
        assert "Normalisation" in text or "normalisation" in text
        assert not re.search(r"normaliz", text, re.I), re.findall(r".{40}normaliz.{20}", text, re.I)


def test_token_page_has_a_styled_create_button_and_a_copy_button_for_the_new_key(tech_client):
    html = tech_client.get(reverse("accounts:tokens")).content.decode()
    assert re.search(r'<button type="submit" class="primary" id="create-token">', html)
    html = tech_client.post(reverse("accounts:tokens"), {"action": "create", "name": "LIS"}).content.decode()
    key = re.search(r'<code id="new-token-key">([^<]+)</code>', html).group(1)
    assert key.startswith("wbc_")
    assert re.search(r'<button type="button"[^>]*data-copy-target="new-token-key"[^>]*>Copy</button>', html)


def test_evaluation_figures_enlarge_and_misclassified_images_have_thumbnails(tech_client, technologist, tiny_record):
    batch = make_known_batch(technologist, tiny_record, [("n1.png", 4, 0.99, False), ("l1.png", 2, 0.95, False)])
    run = create_evaluation(technologist, batch, b"filename,class\nn1.png,neutrophil\nl1.png,monocyte\n", "t.csv")
    html = tech_client.get(reverse("reports:evaluation", args=[run.uid])).content.decode()
    for kind in ("confusion", "roc"):
        url = reverse("reports:evaluation_figure", args=[run.uid, kind])
        assert f'<a href="{url}" data-zoom' in html
    (wrong,) = run.metrics["misclassified"]
    thumbnail = reverse("classifier:prediction_image", args=[wrong["prediction"]])
    table = html[html.index('id="misclassified"') :]
    assert f'<img class="mini" src="{thumbnail}"' in table
