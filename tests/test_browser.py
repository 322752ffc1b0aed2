"""The real pages in headless Chromium (Debian's package, driven by Playwright)."""

import base64
import csv
import io
import os
import shutil

import pytest
from django.urls import reverse

from classifier.models import Prediction
from reports.models import Batch
from tests.conftest import build_tiny_model, image_bytes, start_worker
from tests.factories import ClassifierModelFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _chromium() -> str:
    path = os.environ.get("WBC_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail("Debian's chromium is required for browser tests (scripts/test installs it)")
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the ORM calls here are ordinary sync code.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=_chromium(),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()
    del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


@pytest.fixture
def confident_model(models_dir):
    build_tiny_model(models_dir / "confident.keras", favour=4)
    return ClassifierModelFactory(name="Confident tiny", model_file=models_dir / "confident.keras")


def _log_in(page, live_server):
    page.goto(live_server.url + reverse("login"))
    page.fill("#id_username", "tech_a")
    page.fill("#id_password", "a-long-test-password")
    page.click("button[type=submit]")
    page.wait_for_url(live_server.url + reverse("classifier:classify"))


def _drop_file(page, selector, name, data, mime):
    _drop_files(page, selector, [(name, data, mime)])


def _drop_files(page, selector, files):
    page.evaluate(
        """([selector, files]) => {
            const transfer = new DataTransfer();
            for (const [name, b64, mime] of files) {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name, {type: mime}));
            }
            const zone = document.querySelector(selector);
            zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true, cancelable: true}));
            zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        [selector, [[name, base64.b64encode(data).decode(), mime] for name, data, mime in files]],
    )


def test_log_in_drop_an_image_see_class_saliency_and_threshold_warning(
    browser, live_server, technologist, confident_model
):
    page = browser.new_page()
    _log_in(page, live_server)
    page.select_option("#id_model", str(confident_model.pk))
    _drop_file(page, "#dropzone", "smear-cell.png", image_bytes(size=(120, 110)), "image/png")
    page.wait_for_selector("#predicted-class")
    prediction = Prediction.objects.get()
    assert page.inner_text("#predicted-class") == prediction.predicted_class.capitalize() == "Neutrophil"
    assert prediction.confidence > 0.9

    # the saliency map really loads as an image
    page.wait_for_function(
        "() => { const i = document.querySelector('#saliency-image'); return i.complete && i.naturalWidth > 0; }",
        timeout=60_000,
    )
    assert page.eval_on_selector("#saliency-image", "img => img.naturalWidth") == 120

    # at the default 0.85 the confident result needs no review; at 0.99 the warning appears at once
    assert page.is_hidden("#review-warning")
    page.fill("#threshold", "0.99")  # sets the range value and fires input/change
    page.wait_for_selector("#review-warning", state="visible")
    assert "Manual review suggested: low confidence" in page.inner_text("#review-warning")
    assert page.inner_text("#threshold-value") == "0.99"

    # the choice is remembered for the user (saved by the page, without re-running the model)
    for _ in range(40):
        technologist.refresh_from_db()
        if technologist.review_threshold == 0.99:
            break
        page.wait_for_timeout(100)
    assert technologist.review_threshold == 0.99
    assert Prediction.objects.count() == 1
    page.close()


def test_a_bad_drop_shows_an_alert(browser, live_server, technologist, confident_model):
    page = browser.new_page()
    _log_in(page, live_server)
    _drop_file(page, "#dropzone", "notes.png", b"not an image at all", "image/png")
    page.wait_for_selector("#upload-error")
    assert "notes.png" in page.inner_text("#upload-error")
    assert Prediction.objects.count() == 0
    page.close()


@pytest.fixture
def worker(settings, models_dir):
    process = start_worker(settings, models_dir)
    yield process
    process.terminate()
    process.wait(timeout=20)


def test_batch_drop_several_files_progress_finishes_slider_and_csv(
    browser, live_server, technologist, confident_model, worker
):
    page = browser.new_page()
    _log_in(page, live_server)
    page.goto(live_server.url + reverse("reports:batch_new"))
    page.fill("#id_name", "Slide 42")
    page.select_option("#id_model", str(confident_model.pk))
    files = [(f"cell{i}.png", image_bytes(color=(30 * i, 90, 160)), "image/png") for i in range(4)]
    files.append(("broken.png", b"not an image", "image/png"))
    _drop_files(page, "#batch-dropzone", files)
    assert page.inner_text("#batch-chosen") == "5 files chosen"
    page.click("#batch-button")
    page.wait_for_selector("#batch")
    # the progress bar runs until the worker is done, then the report replaces it by itself
    page.wait_for_selector("#report-table", timeout=120_000)
    assert page.inner_text("#batch-status") == "Done"
    assert page.query_selector("#progress") is None
    assert page.locator("#report-table tbody tr").count() == 4
    assert "broken.png" in page.inner_text("body")
    assert page.inner_text("#review-count") == "0"

    page.fill("#threshold", "0.99")  # every row is below 0.99 with this model: all re-flagged live
    page.wait_for_function("() => document.querySelector('#review-count').textContent === '4'")
    assert page.locator("#report-table tr.needs-review").count() == 4

    with page.expect_download() as download_info:
        page.click("#csv-link")
    content = open(download_info.value.path(), encoding="utf-8").read()
    rows = list(csv.reader(io.StringIO(content)))
    assert rows[0][:6] == ["filename", "predicted_class", "confidence", "needs_review", "timestamp", "processing_ms"]
    assert len(rows) == 5 and all(r[3] == "yes" for r in rows[1:])
    assert Batch.objects.get().status == Batch.Status.DONE
    page.close()
