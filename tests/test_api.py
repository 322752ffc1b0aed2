"""The LIS REST API (/api/v1/): tokens, lab scoping, every error status, classify, batches, CSV, labels."""

from __future__ import annotations

import io
import shutil
import zipfile

import pytest
from django.core.cache import caches
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from accounts.models import ApiToken, User
from classifier.models import ClassifierModel, Prediction
from reports import api as batches_api
from reports.models import Batch, BatchItem, EvaluationRun
from tests.conftest import build_tiny_model, image_bytes, make_known_batch
from tests.factories import ClassifierModelFactory

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
KNOWN_ROWS = [("n1.png", 4, 0.99, False), ("n2.png", 4, 0.90, False), ("l1.png", 2, 0.95, False)]


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_throttle_cache(settings):
    """Throttle counters in memory, empty for every test (the real setting is a file cache under var/)."""
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "api_throttle": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "api-tests"},
    }
    caches["api_throttle"].clear()
    yield
    caches["api_throttle"].clear()


def _client_for(user) -> tuple[APIClient, str]:
    _token, key = ApiToken.issue(user, "LIS")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client, key


@pytest.fixture
def api(technologist):
    return _client_for(technologist)[0]


@pytest.fixture
def outsider_api(outsider):
    return _client_for(outsider)[0]


@pytest.fixture(scope="session")
def neutrophil_model_file(tmp_path_factory):
    """A tiny real Keras model that is confidently class 4, neutrophil (~0.97), whatever the image."""
    path = tmp_path_factory.mktemp("neutrophil-model") / "neutrophil.keras"
    build_tiny_model(path, favour=4)
    return path


@pytest.fixture
def neutrophil_record(db, models_dir, neutrophil_model_file):
    shutil.copy(neutrophil_model_file, models_dir / "neutrophil.keras")
    return ClassifierModelFactory(
        name="Neutrophil CNN", model_file=models_dir / "neutrophil.keras", class_names=CLASSES
    )


def _upload(name: str, data: bytes):
    file = io.BytesIO(data)
    file.name = name
    return file


def _zip(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _error(response, status: int, code: str | None = None) -> dict:
    """The response is ``status`` with the stable error shape (and ``code`` when given)."""
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _media_files(settings) -> list[str]:
    root = settings.MEDIA_ROOT
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()] if root.exists() else []


# --- tokens ------------------------------------------------------------------------------------------------------


def _all_token_columns() -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiToken._meta.db_table}")
        return repr(cursor.fetchall())


def test_token_page_shows_a_new_key_once_and_stores_only_a_hash(tech_client, technologist):
    response = tech_client.post(reverse("accounts:tokens"), {"action": "create", "name": "LIS production"})
    assert response.status_code == 201
    assert response["Cache-Control"] == "no-store"
    token = ApiToken.objects.get(user=technologist)
    key = response.context["new_key"]
    assert key.startswith(f"wbc_{token.prefix}_") and key in response.content.decode()
    stored = _all_token_columns()
    assert key not in stored and key.split("_", 2)[2] not in stored  # neither the key nor its secret part
    assert token.digest == ApiToken.compute_digest(key) and len(token.digest) == 64
    page = tech_client.get(reverse("accounts:tokens")).content.decode()
    assert key not in page and token.shown_prefix in page and "LIS production" in page


def test_token_page_refuses_a_nameless_token_and_revokes_only_own_tokens(tech_client, technologist, outsider):
    response = tech_client.post(reverse("accounts:tokens"), {"action": "create", "name": "  "})
    assert response.status_code == 400 and not ApiToken.objects.exists()
    theirs, _ = ApiToken.issue(outsider, "not yours")
    response = tech_client.post(reverse("accounts:tokens"), {"action": "revoke", "token": theirs.pk})
    assert response.status_code == 404
    theirs.refresh_from_db()
    assert theirs.is_active
    mine, _ = ApiToken.issue(technologist, "mine")
    response = tech_client.post(reverse("accounts:tokens"), {"action": "revoke", "token": mine.pk})
    assert response.status_code == 302
    mine.refresh_from_db()
    assert not mine.is_active


def test_the_user_menu_links_to_the_tokens_page(tech_client):
    assert reverse("accounts:tokens") in tech_client.get(reverse("classifier:classify")).content.decode()


def test_token_life_cycle_through_the_pages_api_with_csrf(technologist):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(technologist)
    browser.get(reverse("accounts:tokens"))  # sets the CSRF cookie
    csrf = browser.cookies["csrftoken"].value
    url = reverse("api:token-list")

    _error(browser.post(url, {"name": "LIS"}, content_type="application/json"), 403, "permission_denied")  # no CSRF
    created = browser.post(url, {"name": "LIS"}, content_type="application/json", HTTP_X_CSRFTOKEN=csrf)
    assert created.status_code == 201, created.content
    body = created.json()
    key = body["key"]
    assert body["is_active"] and body["prefix"].startswith(key[:16])
    assert key not in _all_token_columns()
    listed = browser.get(url).json()
    assert listed["count"] == 1 and "key" not in listed["results"][0]

    lis = APIClient()
    lis.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    me = lis.get(reverse("api:me"))
    assert me.status_code == 200 and me.json()["authenticated_by"] == "token"
    assert me.json()["username"] == technologist.username
    assert ApiToken.objects.get().last_used_at is not None
    _error(lis.get(url), 403, "permission_denied")  # a token cannot list, mint or revoke tokens

    revoked = browser.delete(reverse("api:token-detail", args=[body["id"]]), HTTP_X_CSRFTOKEN=csrf)
    assert revoked.status_code == 204
    assert ApiToken.objects.get().revoked_at is not None
    error = _error(lis.get(reverse("api:me")), 401, "authentication_failed")
    assert "revoked" in error["message"]


def test_bearer_keyword_works_too(technologist):
    _token, key = ApiToken.issue(technologist, "LIS")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get(reverse("api:model-list")).status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        "Token wbc_0123456789ab_not-the-secret",  # unknown prefix
        "Token two parts",  # malformed header
        "Token nonsense",
        "Token ",
    ],
)
def test_bad_tokens_are_401_with_www_authenticate(db, header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get(reverse("api:model-list"))
    _error(response, 401)
    assert response["WWW-Authenticate"].startswith("Token")


def test_right_prefix_with_a_wrong_secret_is_401(technologist):
    token, _key = ApiToken.issue(technologist, "LIS")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token wbc_{token.prefix}_{'x' * 43}")
    _error(client.get(reverse("api:me")), 401, "authentication_failed")


def test_no_credentials_is_401(db):
    response = APIClient().get(reverse("api:batch-list"))
    _error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == 'Token realm="api"'


def test_a_token_of_a_disabled_user_fails(technologist):
    client, _ = _client_for(technologist)
    User.objects.filter(pk=technologist.pk).update(is_active=False)
    _error(client.get(reverse("api:me")), 401, "authentication_failed")


def test_admin_creates_a_token_and_shows_the_key_once(client, technologist, lab_a):
    admin_user = User.objects.create_superuser("root", "root@example.org", "a-long-test-password", laboratory=lab_a)
    client.force_login(admin_user)
    response = client.post(reverse("admin:accounts_apitoken_add"), {"user": technologist.pk, "name": "LIS from admin"})
    assert response.status_code == 200
    key = response.context["key"]
    token = ApiToken.objects.get(name="LIS from admin")
    assert key in response.content.decode() and ApiToken.find(key) == token and key not in _all_token_columns()
    changelist = client.get(reverse("admin:accounts_apitoken_changelist")).content.decode()
    assert key not in changelist and token.prefix in changelist
    client.post(
        reverse("admin:accounts_apitoken_changelist"),
        {"action": "revoke", "_selected_action": [token.pk]},
    )
    assert ApiToken.find(key) is None


# --- models and the caller ---------------------------------------------------------------------------------------


def test_models_list_shows_the_labs_usable_models(api, tiny_record, lab_b):
    ClassifierModel.objects.filter(pk=tiny_record.pk).update(test_accuracy=0.9, parameters=1234)
    other_lab = ClassifierModelFactory(name="Lab B only", class_names=CLASSES, laboratory=lab_b, is_bundled=False)
    body = api.get(reverse("api:model-list")).json()
    assert body["count"] == 1
    model = body["results"][0]
    assert model["id"] == tiny_record.pk and model["input_size"] == [32, 32]
    assert model["normalization"] == {"method": "scale01"} and model["test_accuracy"] == 0.9
    assert model["parameters"] == 1234 and model["is_active"] and model["version"] == "1"
    _error(api.get(reverse("api:model-detail", args=[other_lab.pk])), 404, "not_found")


# --- classify ----------------------------------------------------------------------------------------------------


def test_classify_a_file_returns_the_result_links_and_review_flag(api, neutrophil_record, technologist):
    response = api.post(
        reverse("api:prediction-list"),
        {"file": _upload("cell.png", image_bytes()), "threshold": "0.99", "model": neutrophil_record.pk},
        format="multipart",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    prediction = Prediction.objects.get()
    assert body["id"] == str(prediction.uid) and response["Location"] == body["url"]
    assert body["predicted_class"] == "neutrophil" and body["filename"] == "cell.png"
    assert set(body["probabilities"]) == set(CLASSES)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert body["confidence"] == pytest.approx(body["probabilities"]["neutrophil"], abs=1e-6)
    assert 0.9 < body["confidence"] < 0.99
    assert body["threshold"] == 0.99 and body["needs_review"] is True
    assert body["model"] == {
        "id": neutrophil_record.pk,
        "name": "Neutrophil CNN",
        "version": "1",
        "sha256": neutrophil_record.sha256,
    }
    assert body["processing_ms"] > 0 and isinstance(body["is_outlier"], bool)

    again = api.get(body["url"], {"threshold": "0.5"}).json()
    assert again["id"] == body["id"] and again["threshold"] == 0.5 and again["needs_review"] is False
    assert api.get(body["url"]).json()["threshold"] == technologist.review_threshold

    overlay = api.get(body["saliency"]["gradcam"])
    assert overlay.status_code == 200 and overlay["Content-Type"] == "image/webp"
    content = b"".join(overlay.streaming_content)
    assert content[:4] == b"RIFF" and content[8:12] == b"WEBP"
    _error(api.get(body["saliency"]["gradcam"].replace("gradcam", "sepia")), 400, "invalid")


def test_classify_a_url_goes_through_the_safe_fetcher(api, tiny_record, server):
    url = f"http://localhost:{server}/cell.png"  # a real local server; 'localhost' is on the lab allow-list
    response = api.post(reverse("api:prediction-list"), {"url": url}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["filename"] == "cell.png"
    redirect = api.post(
        reverse("api:prediction-list"), {"url": f"http://localhost:{server}/to-metadata"}, format="json"
    )
    assert _error(redirect, 400, "url_refused")["message"].count("169.254.169.254")


def test_a_refused_url_is_400_with_the_fetchers_reason(api, tiny_record):
    error = _error(
        api.post(reverse("api:prediction-list"), {"url": "http://127.0.0.1/cell.png"}, format="json"),
        400,
        "url_refused",
    )
    assert "loopback" in error["message"] and not Prediction.objects.exists()


def test_a_damaged_image_is_400_with_the_reason_and_nothing_is_stored(api, tiny_record, settings):
    damaged = image_bytes()[:60]
    error = _error(
        api.post(reverse("api:prediction-list"), {"file": _upload("cell.png", damaged)}, format="multipart"),
        400,
        "image_rejected",
    )
    assert "cell.png" in error["message"] and error["details"] == {"file": "cell.png"}
    assert not Prediction.objects.exists() and _media_files(settings) == []


def test_validation_errors_name_each_field(api, tiny_record):
    error = _error(
        api.post(reverse("api:prediction-list"), {"url": "https://x.org/a.png", "threshold": 1.5}, format="json"),
        400,
        "invalid",
    )
    assert "threshold" in error["details"] and "threshold" in error["message"]
    error = _error(api.post(reverse("api:prediction-list"), {}, format="json"), 400, "invalid")
    assert "file" in error["details"]


@pytest.mark.parametrize(
    ("name", "data", "detected"),
    [
        ("cell.gif", image_bytes(fmt="GIF"), "GIF"),
        ("cell.png", b"just some text, not an image\n" * 10, "text"),
        ("cells.zip", _zip(**{"a.png": image_bytes()}), "zip"),
    ],
)
def test_an_upload_that_is_not_jpeg_or_png_by_content_is_415(api, tiny_record, name, data, detected):
    error = _error(
        api.post(reverse("api:prediction-list"), {"file": _upload(name, data)}, format="multipart"),
        415,
        "unsupported_media_type",
    )
    assert detected in error["details"]["detected"] and not Prediction.objects.exists()


def test_a_file_over_the_image_limit_is_413(api, tiny_record, settings):
    settings.WBC_MAX_IMAGE_BYTES = 1000
    error = _error(
        api.post(reverse("api:prediction-list"), {"file": _upload("big.png", b"\x89PNG" + b"0" * 2000)}),
        413,
        "too_large",
    )
    assert error["details"]["limit_bytes"] == 1000 and not Prediction.objects.exists()


def test_an_unavailable_model_is_503(api, tiny_record, models_dir):
    (models_dir / "tiny.keras").unlink()
    response = api.post(reverse("api:prediction-list"), {"file": _upload("cell.png", image_bytes())})
    _error(response, 503, "model_unavailable")
    assert not Prediction.objects.exists()


def test_classifying_needs_the_classify_permission_and_a_laboratory(lab_a, tiny_record):
    viewer = User.objects.create_user("viewer", password="a-long-test-password", laboratory=lab_a)  # no role
    client, _ = _client_for(viewer)
    response = client.post(reverse("api:prediction-list"), {"file": _upload("cell.png", image_bytes())})
    _error(response, 403, "permission_denied")
    assert client.get(reverse("api:batch-list")).status_code == 200  # reading is fine
    homeless = User.objects.create_user("nolab", password="a-long-test-password")
    client, _ = _client_for(homeless)
    error = _error(client.get(reverse("api:batch-list")), 403, "permission_denied")
    assert "laboratory" in error["message"]


def test_unknown_paths_and_methods_are_json_errors(api, db):
    _error(api.get("/api/v1/nothing-here/"), 404, "not_found")
    _error(api.delete(reverse("api:batch-list")), 405, "method_not_allowed")


# --- throttling --------------------------------------------------------------------------------------------------


def test_requests_over_the_rate_are_429_with_retry_after(api, settings):
    settings.WBC_API_RATE = "2/min"
    assert api.get(reverse("api:me")).status_code == 200
    assert api.get(reverse("api:model-list")).status_code == 200
    response = api.get(reverse("api:me"))
    error = _error(response, 429, "throttled")
    assert 1 <= int(response["Retry-After"]) <= 60
    assert error["details"]["retry_after_seconds"] == int(response["Retry-After"])


def test_classify_and_submit_have_their_own_lower_rate_per_token(api, technologist, tiny_record, settings):
    settings.WBC_API_SUBMIT_RATE = "1/min"
    first = api.post(reverse("api:prediction-list"), {"file": _upload("cell.png", image_bytes())})
    assert first.status_code == 201
    _error(api.post(reverse("api:prediction-list"), {"file": _upload("cell.png", image_bytes())}), 429, "throttled")
    assert api.get(reverse("api:me")).status_code == 200  # reading is still allowed
    other_token, _ = _client_for(technologist)  # the rate is per token
    assert (
        other_token.post(reverse("api:prediction-list"), {"file": _upload("c.png", image_bytes())}).status_code == 201
    )


# --- batches -----------------------------------------------------------------------------------------------------


def _submit(client, files=(), headers=None, **fields):
    data = {"files": [_upload(name, content) for name, content in files], **fields}
    return client.post(reverse("api:batch-list"), data, format="multipart", headers=headers or {})


@pytest.mark.django_db(transaction=True)
def test_batch_over_the_api_polled_to_completion_gives_the_differential(
    api, tech_client, neutrophil_record, technologist
):
    files = [
        ("c1.png", image_bytes(color=(200, 100, 160))),
        ("c2.jpg", image_bytes(fmt="JPEG", color=(90, 120, 200))),
        ("slide.zip", _zip(**{"folder/c3.png": image_bytes(color=(10, 200, 10)), "c4.png": image_bytes()})),
        ("junk.png", b"not an image at all"),
    ]
    response = _submit(api, files, external_id="ACC-0042", model=neutrophil_record.pk, threshold="0.9")
    assert response.status_code == 202, response.content
    body = response.json()
    assert response["Location"] == body["url"] and body["status"] == "queued"
    assert body["name"] == "ACC-0042" and body["external_id"] == "ACC-0042" and body["threshold"] == 0.9
    assert body["progress"] == {"total": 5, "done": 0, "failed": 1, "pending": 4, "percent": 20.0, "eta_seconds": None}
    assert body["differential"] is None and body["results"] is None

    call_command("run_worker", "--batch")

    done = api.get(body["url"]).json()
    assert done["status"] == "done" and done["progress"]["done"] == 4 and done["progress"]["pending"] == 0
    differential = done["differential"]
    classes = {c["class_name"]: (c["count"], c["percent"]) for c in differential["classes"]}
    assert classes == {"basophil": (0, 0), "eosinophil": (0, 0), "lymphocyte": (0, 0), "monocyte": (0, 0),
                       "neutrophil": (4, 100.0)}  # fmt: skip
    assert differential["classified"] == 4 and differential["failed"] == 1 and differential["needs_review"] == 0
    assert differential["threshold"] == 0.9
    results = {r["filename"]: r for r in done["results"]}
    assert set(results) == {"c1.png", "c2.jpg", "slide.zip/folder/c3.png", "slide.zip/c4.png", "junk.png"}
    good = results["c1.png"]
    assert good["status"] == "done" and good["predicted_class"] == "neutrophil" and good["confidence"] > 0.9
    assert set(good["probabilities"]) == set(CLASSES) and good["processing_ms"] > 0 and not good["needs_review"]
    assert results["junk.png"]["status"] == "failed" and "not a readable image" in results["junk.png"]["error"]
    strict = api.get(body["url"], {"threshold": "0.99"}).json()["differential"]
    assert strict["needs_review"] == 4 and strict["threshold"] == 0.99

    uid = body["id"]
    for threshold in ("0.9", "0.99"):
        web = tech_client.get(reverse("reports:batch_csv", args=[uid]), {"threshold": threshold})
        mine = api.get(reverse("api:batch-report", args=[uid]), {"threshold": threshold})
        assert mine.status_code == 200 and mine["Content-Type"] == "text/csv; charset=utf-8"
        assert mine.content == web.content and mine["Content-Disposition"] == web["Content-Disposition"]
        web = tech_client.get(reverse("reports:batch_summary_csv", args=[uid]), {"threshold": threshold})
        assert api.get(reverse("api:batch-summary", args=[uid]), {"threshold": threshold}).content == web.content
    technologist.refresh_from_db()
    assert technologist.default_model_id == neutrophil_record.pk  # remembered, as the batch page does


def test_the_csv_defaults_to_the_batch_threshold(api, tech_client, technologist, tiny_record):
    batch = make_known_batch(technologist, tiny_record, KNOWN_ROWS)
    assert batch.threshold == technologist.review_threshold == 0.85
    web = tech_client.get(reverse("reports:batch_csv", args=[batch.uid]))
    assert api.get(reverse("api:batch-report", args=[batch.uid]), HTTP_ACCEPT="text/csv").content == web.content
    _error(api.get(reverse("api:batch-report", args=[batch.uid]), {"threshold": "2"}), 400, "invalid")


def test_urls_in_a_batch_are_fetched_and_refused_ones_listed(api, tiny_record, server):
    urls = [f"http://localhost:{server}/cell.png", "http://10.0.0.1/b.png"]
    response = api.post(reverse("api:batch-list"), {"urls": urls, "external_id": "U-1"}, format="json")
    assert response.status_code == 202, response.content
    items = {i.original_filename: i for i in Batch.objects.get().items.all()}
    assert set(items) == set(urls)
    assert items[urls[0]].status == BatchItem.Status.PENDING
    assert items[urls[1]].status == BatchItem.Status.FAILED and "private" in items[urls[1]].error


def test_a_batch_of_only_bad_files_is_400_per_file_and_stores_nothing(api, tiny_record, settings):
    error = _error(_submit(api, [("a.png", b"text"), ("b.jpg", b"")], external_id="ACC-1"), 400, "all_files_rejected")
    assert [f["file"] for f in error["details"]["files"]] == ["a.png", "b.jpg"]
    assert all(f["reason"] for f in error["details"]["files"])
    assert not Batch.objects.exists() and not BatchItem.objects.exists() and _media_files(settings) == []


def test_an_empty_submit_is_400(api, tiny_record):
    error = _error(api.post(reverse("api:batch-list"), {"external_id": "x"}, format="json"), 400, "invalid")
    assert "files" in error["details"]


def test_a_batch_over_the_limits_is_413(api, tiny_record, settings):
    settings.WBC_BATCH_MAX_FILES = 2
    files = [(f"c{i}.png", image_bytes()) for i in range(3)]
    _error(_submit(api, files), 413, "batch_too_large")
    settings.WBC_BATCH_MAX_URLS = 1
    urls = ["https://a.example.org/1.png", "https://a.example.org/2.png"]
    _error(api.post(reverse("api:batch-list"), {"urls": urls}, format="json"), 413, "batch_too_large")
    assert not Batch.objects.exists()


def test_idempotent_submit_returns_the_same_batch_and_refuses_a_different_payload(api, tiny_record, settings):
    files = [("c1.png", image_bytes()), ("c2.png", image_bytes(color=(1, 2, 3)))]
    headers = {"Idempotency-Key": "lis-7f3c9a"}
    first = _submit(api, files, headers=headers, external_id="ACC-7")
    assert first.status_code == 202
    stored = sorted(_media_files(settings))

    retry = _submit(api, files, headers=headers, external_id="ACC-7")
    assert retry.status_code == 200 and retry["Idempotent-Replayed"] == "true"
    assert retry.json()["id"] == first.json()["id"] and retry["Location"] == first["Location"]
    assert Batch.objects.count() == 1 and sorted(_media_files(settings)) == stored  # nothing new

    changed_content = [("c1.png", image_bytes()), ("c2.png", image_bytes(color=(9, 9, 9)))]
    for response in (
        _submit(api, files, headers=headers, external_id="ACC-8"),
        _submit(api, changed_content, headers=headers, external_id="ACC-7"),
        _submit(api, files[:1], headers=headers, external_id="ACC-7"),
    ):
        error = _error(response, 409, "idempotency_key_reused")
        assert error["details"]["batch"] == first.json()["id"]
    assert Batch.objects.count() == 1 and sorted(_media_files(settings)) == stored
    _error(_submit(api, files, headers={"Idempotency-Key": "has spaces"}), 400, "invalid_idempotency_key")


def test_idempotency_keys_are_per_laboratory(api, outsider_api, tiny_record):
    files = [("c1.png", image_bytes())]
    headers = {"Idempotency-Key": "same-key"}
    assert _submit(api, files, headers=headers).status_code == 202
    assert _submit(outsider_api, files, headers=headers).status_code == 202
    assert Batch.objects.count() == 2


def test_a_concurrent_retry_that_loses_the_race_gets_the_winners_batch(api, tiny_record, monkeypatch):
    """The retry passed the look-up before the first request committed; the unique constraint catches it."""
    real_submit = batches_api.submit_batch

    def racing_submit(*args, **kwargs):
        real_submit(*args, **kwargs)  # the other request commits first ...
        return real_submit(*args, **kwargs)  # ... so this one hits the constraint

    monkeypatch.setattr(batches_api, "submit_batch", racing_submit)
    response = _submit(api, [("c1.png", image_bytes())], headers={"Idempotency-Key": "race-1"}, external_id="R")
    assert response.status_code == 200 and response["Idempotent-Replayed"] == "true"
    assert Batch.objects.count() == 1 and response.json()["id"] == str(Batch.objects.get().uid)


def test_batch_list_filters_paginates_newest_first(api, technologist, outsider, tiny_record):
    from datetime import datetime

    from django.utils import timezone

    def batch(name, external_id, status, day):
        made = Batch.objects.create(
            laboratory=technologist.laboratory,
            user=technologist,
            name=name,
            external_id=external_id,
            model=tiny_record,
            status=status,
        )
        when = timezone.make_aware(datetime(2026, 3, day, 12, 0))
        Batch.objects.filter(pk=made.pk).update(created_at=when)
        return made

    b1 = batch("one", "ACC-1", Batch.Status.DONE, 1)
    b2 = batch("two", "ACC-2", Batch.Status.QUEUED, 2)
    b3 = batch("three", "ACC-1", Batch.Status.DONE, 3)
    make_known_batch(outsider, tiny_record, KNOWN_ROWS, name="other lab")  # never listed

    def ids(**params):
        body = api.get(reverse("api:batch-list"), params).json()
        return [b["id"] for b in body["results"]], body

    assert ids()[0] == [str(b3.uid), str(b2.uid), str(b1.uid)]
    assert ids(external_id="ACC-1")[0] == [str(b3.uid), str(b1.uid)]
    assert ids(status="queued")[0] == [str(b2.uid)]
    assert ids(created_after="2026-03-02")[0] == [str(b3.uid), str(b2.uid)]
    assert ids(created_before="2026-03-02")[0] == [str(b2.uid), str(b1.uid)]  # a date includes that day
    assert ids(created_after="2026-03-01T13:00:00Z", created_before="2026-03-03T11:00:00+00:00")[0] == [str(b2.uid)]
    first_page, body = ids(page_size=2)
    assert first_page == [str(b3.uid), str(b2.uid)] and body["count"] == 3 and body["next"]
    assert api.get(body["next"]).json()["results"][0]["id"] == str(b1.uid)
    summary = api.get(reverse("api:batch-list"), {"external_id": "ACC-1"}).json()["results"][0]
    assert summary["model"]["id"] == tiny_record.pk and summary["progress"]["total"] == 0
    error = _error(api.get(reverse("api:batch-list"), {"created_after": "last tuesday"}), 400, "invalid")
    assert "created_after" in error["details"]
    _error(api.get(reverse("api:batch-list"), {"status": "exploded"}), 400, "invalid")


# --- labels: evaluation runs -------------------------------------------------------------------------------------


LABELS = b"filename,class\nn1.png,neutrophil\nn2.png,lymphocyte\nl1.png,lymphocyte\nnot-in-batch.png,monocyte\n"


def test_labels_make_an_evaluation_run(api, technologist, tiny_record):
    batch = make_known_batch(technologist, tiny_record, KNOWN_ROWS)
    url = reverse("api:batch-evaluations", args=[batch.uid])
    response = api.post(url, {"labels": _upload("truth.csv", LABELS), "threshold": "0.9"}, format="multipart")
    assert response.status_code == 201, response.content
    body = response.json()
    run = EvaluationRun.objects.get()
    assert body["id"] == str(run.uid) and response["Location"] == body["url"]
    assert body["n_labelled"] == 3 and body["threshold"] == 0.9 and body["labels_filename"] == "truth.csv"
    assert body["metrics"]["all"]["accuracy"] == pytest.approx(2 / 3)
    assert [p["filename"] for p in body["problems"]["unmatched_rows"]] == ["not-in-batch.png"]
    assert body["batch"]["id"] == str(batch.uid)
    assert api.get(body["url"]).json()["metrics"] == body["metrics"]
    listed = api.get(url).json()
    assert listed["count"] == 1 and listed["results"][0]["id"] == body["id"]


def test_bad_label_files_and_unfinished_batches_are_refused(api, technologist, tiny_record):
    batch = make_known_batch(technologist, tiny_record, KNOWN_ROWS)
    url = reverse("api:batch-evaluations", args=[batch.uid])
    error = _error(api.post(url, {"labels": _upload("t.csv", b"name;label\na;b\n")}), 400, "invalid_labels")
    assert "filename" in error["message"]
    _error(api.post(url, {"labels": _upload("t.csv", b"filename,class\nzzz.png,monocyte\n")}), 400, "labels_refused")
    _error(api.post(url, {}), 400, "invalid")
    Batch.objects.filter(pk=batch.pk).update(status=Batch.Status.RUNNING)
    _error(api.post(url, {"labels": _upload("t.csv", LABELS)}), 409, "batch_not_finished")
    assert not EvaluationRun.objects.exists()


# --- lab scoping -------------------------------------------------------------------------------------------------


def test_another_labs_objects_are_404_on_every_endpoint(api, outsider_api, technologist, tiny_record, prediction):
    batch = make_known_batch(technologist, tiny_record, KNOWN_ROWS)
    run = api.post(
        reverse("api:batch-evaluations", args=[batch.uid]), {"labels": _upload("t.csv", LABELS)}, format="multipart"
    ).json()
    urls = [
        reverse("api:batch-detail", args=[batch.uid]),
        reverse("api:batch-report", args=[batch.uid]),
        reverse("api:batch-summary", args=[batch.uid]),
        reverse("api:batch-evaluations", args=[batch.uid]),
        reverse("api:prediction-detail", args=[prediction.uid]),
        reverse("api:prediction-saliency", args=[prediction.uid]) + "?method=gradcam",
        reverse("api:evaluation-detail", args=[run["id"]]),
    ]
    for url in urls:
        assert api.get(url).status_code == 200, url
        _error(outsider_api.get(url), 404, "not_found")
    labels = {"labels": _upload("t.csv", LABELS)}
    _error(outsider_api.post(reverse("api:batch-evaluations", args=[batch.uid]), labels), 404, "not_found")
    for name in ("batch-list", "prediction-list", "evaluation-list"):
        assert outsider_api.get(reverse(f"api:{name}")).json()["count"] == 0, name
    assert EvaluationRun.objects.count() == 1


# --- schema and documentation pages ------------------------------------------------------------------------------


def test_the_schema_needs_authentication_and_the_docs_need_a_log_in(api, tech_client):
    schema = api.get(reverse("api:schema"), HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200 and schema.json()["openapi"].startswith("3.")
    assert "/api/v1/batches/{uid}/report/" in schema.json()["paths"]
    _error(APIClient().get(reverse("api:schema")), 401)
    assert Client().get(reverse("api:docs")).status_code == 302  # to the log-in page
    for name in ("api:docs", "api:redoc"):
        page = tech_client.get(reverse(name))
        assert page.status_code == 200
        html = page.content.decode()
        assert "drf_spectacular_sidecar" in html and "cdn.jsdelivr" not in html  # no internet needed
