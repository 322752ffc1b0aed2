"""The review station in headless Chromium: a slide classified by the real worker, reviewed with the keyboard and the
mouse, saved at once, signed, refused while signed, amended; plus the page's own checks (lab scope, no inline
script) and the models table at a laptop's width."""

import re
import time

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Group
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.test import Client
from django.urls import reverse
from playwright.sync_api import expect

from classifier.models import Prediction
from reports.models import Batch, CellVerification, ReportVersion
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from tests.conftest import image_bytes
from tests.factories import TEST_PASSWORD, ClassifierModelFactory, UserFactory
from tests.test_browser import browser, worker  # noqa: F401  (the shared Chromium and real-worker fixtures)
from wbc_ml.datasets import WBC_CLASSES

REVIEW = "__review"


def _classified_slide(user, record, n: int) -> Batch:
    """A slide of ``n`` generated cells, classified by the real worker process (bounded wait)."""
    entries = [
        NamedBytes(f"cell{i:02d}.png", image_bytes(size=(90, 84), color=(25 * i % 255, 90, 180))) for i in range(n)
    ]
    batch = submit_batch(user, entries, record, name="Ward 4 slide")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        batch.refresh_from_db()
        if batch.is_finished:
            break
        time.sleep(0.2)
    assert batch.status == Batch.Status.DONE, batch.error
    return batch


def _page(browser, live_server, user, width=1366, height=768):  # noqa: F811
    """A browser page logged in as ``user`` (the session made by the test client, handed to Chromium)."""
    client = Client()
    client.force_login(user)
    context = browser.new_context(viewport={"width": width, "height": height})
    session = client.cookies[django_settings.SESSION_COOKIE_NAME].value
    context.add_cookies([{"name": django_settings.SESSION_COOKIE_NAME, "value": session, "url": live_server.url}])
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.script_errors = errors
    return page


def _open_review(page, live_server, batch):
    page.goto(live_server.url + reverse("reports:review", args=[batch.uid]))
    page.wait_for_selector(".cell")


def _tile(group: str, item_id: int | None = None) -> str:
    cell = f'.cell[data-id="{item_id}"]' if item_id else ".cell"
    return f'.cell-group[data-group="{group}"] {cell}'


def _row_count(page, name: str) -> int:
    return int(page.inner_text(f'#differential tr[data-class="{name}"] td.num >> nth=0'))


def _saving(page):
    return page.expect_response(lambda r: r.url.endswith("/review/classify.json") and r.request.method == "POST")


def _other_class(ai_class: str) -> tuple[str, str]:
    """A WBC class that is not the AI's, with its hotkey (1–5)."""
    index = next(i for i, name in enumerate(WBC_CLASSES) if name != ai_class)
    return WBC_CLASSES[index], str(index + 1)


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_review_a_flagged_cell_reload_sign_refused_while_signed_then_amend(
    browser,  # noqa: F811
    live_server,
    technologist,
    tiny_record,
    worker,  # noqa: F811
):
    batch = _classified_slide(technologist, tiny_record, 6)
    items = list(batch.items.select_related("prediction").order_by("position"))
    assert all(item.thumbnail for item in items)  # the worker made every thumbnail
    flagged = [item for item in items if item.prediction.needs_review(batch.threshold)]
    assert len(flagged) >= 2  # the untrained tiny model is unsure of everything

    page = _page(browser, live_server, technologist)
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    _open_review(page, live_server, batch)
    assert page.locator(_tile(REVIEW)).count() == len(flagged)
    # Loading the gallery asks for nothing per cell but thumbnails (the inspector shows only the selected cell).
    page.wait_for_timeout(500)
    per_cell = [u for u in requests if "/predictions/" in u]
    assert len(per_cell) <= 2, per_cell
    assert any(re.search(r"/cells/\d+/thumb$", u) for u in requests)

    # Select a flagged cell, press the key of another class: saved at once, the cell moves, the differential follows.
    cell = flagged[0]
    target, hotkey = _other_class(cell.prediction.predicted_class)
    before = _row_count(page, target)
    page.click(_tile(REVIEW, cell.pk))
    assert "selected" in page.get_attribute(_tile(REVIEW, cell.pk), "class")
    with _saving(page):
        page.keyboard.press(hotkey)
    page.wait_for_selector(_tile(target, cell.pk))
    assert _row_count(page, target) == before + 1
    assert CellVerification.objects.get(item=cell).verified_class == target
    assert Prediction.objects.get(pk=cell.prediction_id).predicted_class != target  # the AI's class is kept beside

    page.reload()
    page.wait_for_selector(_tile(target, cell.pk))
    assert _row_count(page, target) == before + 1
    assert page.locator(_tile(REVIEW)).count() == len(flagged) - 1

    # Signing is refused while cells remain to review: the server's reason is shown.
    page.fill("#sign-password", TEST_PASSWORD)
    page.click("#sign-button")
    page.wait_for_selector("#review-error:not([hidden])")
    assert "still to review" in page.inner_text("#review-error")
    assert not ReportVersion.objects.exists()

    # Review the rest at once (every cell of the group), then sign with the password typed again.
    page.click(_tile(REVIEW) + " >> nth=0")
    page.keyboard.press("Control+a")
    assert page.locator(".cell.selected").count() == len(flagged) - 1
    with _saving(page):
        page.keyboard.press("5")
    expect(page.locator(_tile(REVIEW))).to_have_count(0)
    page.fill("#sign-password", TEST_PASSWORD)
    page.click("#sign-button")
    expect(page.locator("#version")).to_have_text("Version 1")
    assert page.inner_text("#slide-state").lower() == "final"
    assert page.is_visible("#locked-banner") and page.is_visible("#amend-form") and page.is_hidden("#sign-form")
    assert "locked" in page.get_attribute("#gallery", "class")
    assert ReportVersion.objects.get().signed_by == technologist

    # Editing the signed slide is refused with the server's 409 sentence, and nothing changes.
    page.click(_tile(target, cell.pk))
    with _saving(page) as answer:
        page.keyboard.press("1" if target != "basophil" else "2")
    assert answer.value.status == 409
    page.wait_for_selector("#review-error:not([hidden])")
    assert "locked" in page.inner_text("#review-error")
    assert CellVerification.objects.get(item=cell).verified_class == target

    # Amend with a reason: version 2 opens and the slide can be changed again.
    page.click("#amend-button")  # the reason is required: the browser keeps the form until it is given
    assert ReportVersion.objects.count() == 1
    page.fill("#amend-reason", "Second look: one lymphocyte was a monocyte")
    page.click("#amend-button")
    expect(page.locator("#version")).to_have_text("Version 2")
    assert page.inner_text("#slide-state").lower() == "amending"
    assert ReportVersion.objects.get(number=2).amendment_reason == "Second look: one lymphocyte was a monocyte"
    page.click(_tile(target, cell.pk))
    with _saving(page) as answer:
        page.keyboard.press("4" if target != "monocyte" else "3")
    assert answer.value.status == 200
    assert page.script_errors == []
    page.context.close()


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_shift_selects_several_cells_and_undo_puts_them_back(
    browser,  # noqa: F811
    live_server,
    technologist,
    tiny_record,
    worker,  # noqa: F811
):
    batch = _classified_slide(technologist, tiny_record, 7)
    page = _page(browser, live_server, technologist)
    _open_review(page, live_server, batch)
    review_ids = [int(i) for i in page.eval_on_selector_all(_tile(REVIEW), "tiles => tiles.map(t => t.dataset.id)")]
    assert len(review_ids) >= 5
    lymphocytes = _row_count(page, "lymphocyte")

    # Click, then Shift+arrows: three neighbours; Shift+click extends the same range to five.
    page.click(_tile(REVIEW, review_ids[0]))
    page.keyboard.press("Shift+ArrowRight")
    page.keyboard.press("Shift+ArrowRight")
    assert page.locator(".cell.selected").count() == 3
    page.click(_tile(REVIEW, review_ids[4]), modifiers=["Shift"])
    chosen = review_ids[:5]
    selected = [int(i) for i in page.eval_on_selector_all(".cell.selected", "tiles => tiles.map(t => t.dataset.id)")]
    assert sorted(selected) == sorted(chosen)
    # Ctrl+click takes one out again.
    page.click(_tile(REVIEW, review_ids[2]), modifiers=["Control"])
    chosen.remove(review_ids[2])
    assert page.locator(".cell.selected").count() == 4

    with _saving(page):
        page.keyboard.press("3")  # lymphocyte
    for item_id in chosen:
        page.wait_for_selector(_tile("lymphocyte", item_id))
    assert set(CellVerification.objects.values_list("item_id", flat=True)) == set(chosen)
    moved_in = sum(1 for i in chosen if Prediction.objects.get(batch_item=i).predicted_class != "lymphocyte")
    assert _row_count(page, "lymphocyte") == lymphocytes + moved_in

    # A second change to one of them, then two undos: first back to lymphocyte, then back to unverified.
    page.click(_tile("lymphocyte", chosen[0]))
    with _saving(page):
        page.keyboard.press("2")  # eosinophil
    page.wait_for_selector(_tile("eosinophil", chosen[0]))
    with _saving(page):
        page.keyboard.press("Control+z")
    page.wait_for_selector(_tile("lymphocyte", chosen[0]))
    assert CellVerification.objects.get(item_id=chosen[0]).verified_class == "lymphocyte"
    with _saving(page):
        page.click("#undo-button")
    expect(page.locator(_tile(REVIEW))).to_have_count(len(review_ids))
    assert not CellVerification.objects.exists()
    assert _row_count(page, "lymphocyte") == lymphocytes
    assert page.is_disabled("#undo-button")

    # Drag and drop: a cell dropped on the Monocyte group is saved there (a selected cell carries the selection).
    page.click(_tile(REVIEW, review_ids[1]))
    with _saving(page):
        page.drag_and_drop(_tile(REVIEW, review_ids[1]), '.cell-group[data-group="monocyte"]')
    page.wait_for_selector(_tile("monocyte", review_ids[1]))
    assert CellVerification.objects.get(item_id=review_ids[1]).verified_class == "monocyte"
    assert CellVerification.objects.count() == 1

    # A non-WBC key (8: platelet) leaves the WBC differential and is counted per 100 WBC.
    counted = int(page.inner_text("#counted"))
    page.click(_tile(REVIEW, review_ids[3]))
    with _saving(page):
        page.keyboard.press("8")
    page.wait_for_selector(_tile("platelet", review_ids[3]))
    expect(page.locator("#non-wbc")).to_contain_text("Platelet")
    assert int(page.inner_text("#counted")) == counted - 1
    page.reload()
    page.wait_for_selector(_tile("monocyte", review_ids[1]))
    page.wait_for_selector(_tile("platelet", review_ids[3]))
    assert page.script_errors == []
    page.context.close()


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_countersign_is_offered_to_a_supervisor_who_did_not_sign(
    browser,  # noqa: F811
    live_server,
    technologist,
    tiny_record,
    lab_a,
):
    from accounts.models import LabSettings
    from tests.conftest import make_known_batch

    LabSettings.objects.update_or_create(laboratory=lab_a, defaults={"two_person_signoff": True})
    slide = make_known_batch(technologist, tiny_record, [("n1.png", 4, 0.99, False), ("n2.png", 4, 0.98, False)])
    default_storage.save("cells/x.png", ContentFile(image_bytes()))  # the image the known predictions point to
    supervisor = UserFactory(username="super_a", laboratory=lab_a)
    supervisor.groups.add(Group.objects.get(name="Supervisor"))

    page = _page(browser, live_server, technologist)
    _open_review(page, live_server, slide)
    page.fill("#sign-password", TEST_PASSWORD)
    page.click("#sign-button")
    expect(page.locator("#slide-state")).to_have_text("Awaiting countersign")
    assert page.is_hidden("#countersign-form")  # the signer is not offered the second signature
    page.context.close()

    page = _page(browser, live_server, supervisor)
    _open_review(page, live_server, slide)
    page.fill("#countersign-password", "not my password")
    page.click("#countersign-button")
    page.wait_for_selector("#review-error:not([hidden])")
    assert "password" in page.inner_text("#review-error")
    page.fill("#countersign-password", TEST_PASSWORD)
    page.click("#countersign-button")
    expect(page.locator("#slide-state")).to_have_text("Final")
    assert ReportVersion.objects.get().countersigned_by == supervisor
    page.context.close()


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_models_table_fits_its_card_at_1366_px(browser, live_server, model_admin):  # noqa: F811
    serving = "ONNX Runtime (max |Δp| vs TensorFlow on probe batch: 3.2e-07)"
    for name, parameters in [("MobileNetV2 (fine-tuned)", 2264389), ("MobileNetV2 (head)", 2264389)]:
        ClassifierModelFactory(name=name, parameters=parameters, onnx_status=serving, test_accuracy=0.9885)
    ClassifierModelFactory(
        name="Our lab's retrained CNN with a long name",
        parameters=421317,
        is_bundled=False,
        laboratory=model_admin.laboratory,
        onnx_status="TensorFlow fallback: the converter does not support this layer",
    )
    page = _page(browser, live_server, model_admin)
    page.goto(live_server.url + reverse("classifier:models"))
    page.wait_for_selector("#models-table")
    fits = page.eval_on_selector(
        "#models-table",
        "table => { const card = table.closest('.card'); const box = card.getBoundingClientRect();"
        " const t = table.getBoundingClientRect(); return [t.right <= box.right, t.width, box.width]; }",
    )
    assert fits[0], fits
    assert "2.26 M" in page.inner_text("#models-table")
    page.context.close()


@pytest.mark.django_db
def test_review_page_is_scoped_to_the_lab_and_has_no_inline_script(client, technologist, outsider, tiny_record):
    from tests.conftest import make_known_batch

    slide = make_known_batch(technologist, tiny_record, [("n1.png", 4, 0.99, False)])
    url = reverse("reports:review", args=[slide.uid])
    client.force_login(outsider)
    assert client.get(url).status_code == 404
    client.force_login(technologist)
    html = client.get(url).content.decode()
    assert 'id="review-station"' in html
    assert f'data-state-url="{reverse("reports:review_state", args=[slide.uid])}"' in html
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all("src=" in tag for tag in scripts)  # a strict Content-Security-Policy allows these
    assert not re.search(r"\son[a-z]+\s*=", html)  # no inline event handlers
    assert not re.search(r"\sstyle\s*=", html)


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_out_of_scope_banner_count_warning_flag_reasons_and_full_image_fallback(
    browser,  # noqa: F811
    live_server,
    technologist,
    tiny_record,
):
    from reports.differential import OUT_OF_SCOPE_WARNING
    from tests.conftest import make_known_batch

    rows = [("n1.png", 4, 0.99, False), ("odd.png", 4, 0.98, True), ("low.png", 2, 0.55, False)]
    slide = make_known_batch(technologist, tiny_record, rows)  # an old slide: its items have no thumbnail
    default_storage.save("cells/x.png", ContentFile(image_bytes()))
    page = _page(browser, live_server, technologist)
    _open_review(page, live_server, slide)

    expect(page.locator("#out-of-scope")).to_be_visible()  # 2 of 3 flagged, over the lab's 30 %
    assert OUT_OF_SCOPE_WARNING in page.inner_text("#out-of-scope")
    assert page.get_attribute("#out-of-scope #adapt-link", "href") == reverse("adaptation:page")
    assert page.locator(f'#out-of-scope a[href="{reverse("classifier:models")}"]').count() == 1
    expect(page.locator("#count-warning")).to_contain_text("Counted 3 of 100 WBC")
    assert "short" in page.get_attribute("#count-pill", "class")

    odd, low = (slide.items.get(original_filename=name) for name in ("odd.png", "low.png"))
    assert "unlike the five white-cell classes" in page.get_attribute(_tile(REVIEW, odd.pk), "title")
    assert "low confidence" in page.get_attribute(_tile(REVIEW, low.pk), "title")
    image = reverse("classifier:prediction_image", args=[odd.prediction.uid])
    assert page.get_attribute(_tile(REVIEW, odd.pk) + " img", "src") == image  # no thumbnail: the full image
    expect(page.locator(_tile(REVIEW, odd.pk) + " img")).to_have_js_property("naturalWidth", 64)
    assert page.script_errors == []
    page.context.close()
