"""A normalisation override that would make the model's numbers meaningless is refused where it is typed; a model
output that is not a finite number fails that image with a message; a batch whose task keeps failing stops."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from django.core.cache import caches
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone
from PIL import Image
from rest_framework.test import APIClient

from accounts.models import ApiToken
from classifier.models import ClassifierModel, Prediction
from reports.models import Batch, BatchItem
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from tests.conftest import TINY_SIZE, image_bytes
from wbc_ml.checksums import file_sha256
from wbc_ml.datasets import WBC_CLASSES
from wbc_ml.preprocessing import Normalization

TINY_STD = {"method": "zscore", "mean": [0, 0, 0], "std": [1e-38, 1e-38, 1e-38]}


@pytest.fixture(autouse=True)
def _isolated_throttle_cache(settings):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "api_throttle": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "norm-tests"},
    }
    caches["api_throttle"].clear()


@pytest.fixture
def api(technologist):
    _token, key = ApiToken.issue(technologist, "LIS")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def _upload(name: str, data: bytes):
    file = io.BytesIO(data)
    file.name = name
    return file


# --- the one rule ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mean", "std", "words"),
    [
        ([0, 0, 0], [1e-38, 1e-38, 1e-38], "std"),
        ([0, 0, 0], [1e-4, 1, 1], "0.001"),
        ([0, 0, 0], [0, 1, 1], "std"),
        ([0, 0, 0], [-1, 1, 1], "std"),
        ([math.nan, 0, 0], [1, 1, 1], "mean"),
        ([math.inf, 0, 0], [1, 1, 1], "mean"),
        ([0, 0, 0], [math.inf, 1, 1], "std"),
        ([1e30, 0, 0], [1, 1, 1], "mean"),
        ([0, 0, 0], [1e30, 1, 1], "std"),
    ],
)
def test_unusable_mean_or_std_is_refused_with_a_message(mean, std, words):
    with pytest.raises(ValueError, match=words):
        Normalization.from_dict({"method": "zscore", "mean": mean, "std": std})


def test_usual_normalisations_are_accepted():
    for spec in (
        {"method": "scale01"},
        {"method": "zscore", "mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5]},
        {"method": "zscore", "mean": [0.0, 0.0, 0.0], "std": [0.001, 0.001, 0.001]},
        {"method": "zscore", "mean": [123.68, 116.78, 103.94], "std": [58.4, 57.1, 57.4]},
    ):
        assert Normalization.from_dict(spec).to_dict()["method"] == spec["method"]


def test_every_bundled_model_card_passes_the_rule(settings):
    cards = list(Path(settings.BASE_DIR, "models").glob("*.json"))
    assert cards
    for card in cards:
        Normalization.from_dict(json.loads(card.read_text())["normalization"])


# --- where the override is typed ---------------------------------------------------------------------------------


def test_api_classify_with_a_tiny_std_is_400_and_stores_nothing(api, tiny_record):
    response = api.post(
        reverse("api:prediction-list"),
        {
            "file": _upload("c.png", image_bytes()),
            "normalization": json.dumps(TINY_STD),
        },
        format="multipart",
    )
    assert response.status_code == 400, response.content[:500]
    error = response.json()["error"]
    assert "std" in error["message"] + str(error["details"])
    assert not Prediction.objects.exists()


def test_api_batch_with_a_tiny_std_is_400_and_stores_nothing(api, tiny_record):
    response = api.post(
        reverse("api:batch-list"),
        {"urls": ["https://images.example.org/a.png"], "normalization": TINY_STD},
        format="json",
    )
    assert response.status_code == 400, response.content[:500]
    assert "0.001" in str(response.json()["error"])
    assert not Batch.objects.exists()


def test_batch_page_with_a_tiny_std_says_why(tech_client, tiny_record):
    response = tech_client.post(
        reverse("reports:batch_new"),
        {
            "name": "Tiny std",
            "files": [_upload("a.png", image_bytes())],
            "model": tiny_record.pk,
            "normalization": "zscore",
            "norm_mean": "0, 0, 0",
            "norm_std": "1e-38, 1e-38, 1e-38",
        },
    )
    assert response.status_code == 400 and "0.001" in response.text
    assert not Batch.objects.exists()


# --- a model whose output is not a finite number -----------------------------------------------------------------


def build_overflowing_model(path) -> None:
    """A real Keras model whose first logit overflows to +inf for bright images (softmax then gives NaN), while a
    dark image gets finite probabilities: logit0 = 3e38 · (mean red + mean green) of the 0–1 image."""
    import keras

    inputs = keras.Input(shape=(*TINY_SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(inputs)
    kernel = np.zeros((3, 5), np.float32)
    kernel[0, 0] = kernel[1, 0] = 3e38
    outputs = keras.layers.Dense(
        5,
        activation="softmax",
        name="probabilities",
        kernel_initializer=keras.initializers.Constant(kernel),
        bias_initializer="zeros",
    )(pooled)
    keras.Model(inputs, outputs).save(path)


@pytest.fixture(scope="session")
def overflowing_model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("overflowing-model") / "overflow.keras"
    build_overflowing_model(path)
    return path


@pytest.fixture
def overflow_record(db, models_dir, overflowing_model_file):
    shutil.copy(overflowing_model_file, models_dir / "overflow.keras")
    return ClassifierModel.objects.create(
        name="Overflowing CNN",
        version="1",
        architecture="tiny",
        file_name="overflow.keras",
        sha256=file_sha256(models_dir / "overflow.keras"),
        input_height=TINY_SIZE[0],
        input_width=TINY_SIZE[1],
        normalization={"method": "scale01"},
        class_names=list(WBC_CLASSES),
        is_bundled=True,
    )


def _dark_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (5, 5, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_non_finite_output_for_one_image_is_a_clear_400_and_nothing_is_stored(api, overflow_record, settings):
    response = api.post(
        reverse("api:prediction-list"),
        {"file": _upload("bright.png", image_bytes()), "model": overflow_record.pk},
        format="multipart",
    )
    assert response.status_code == 400, response.content[:500]
    assert "not a finite number" in response.json()["error"]["message"]
    assert not Prediction.objects.exists()
    assert not [p for p in settings.MEDIA_ROOT.rglob("*") if p.is_file()]
    # the same model answers normally for an image it does not overflow on
    ok = api.post(
        reverse("api:prediction-list"),
        {"file": _upload("dark.png", _dark_png()), "model": overflow_record.pk},
        format="multipart",
    )
    assert ok.status_code == 201, ok.content[:500]


@pytest.mark.django_db(transaction=True)
def test_non_finite_output_fails_only_that_image_of_a_batch(technologist, overflow_record):
    entries = [NamedBytes("bright.png", image_bytes()), NamedBytes("dark.png", _dark_png())]
    batch = submit_batch(technologist, entries, overflow_record, name="Overflow")
    call_command("run_worker", "--batch")
    batch.refresh_from_db()
    assert batch.status == Batch.Status.DONE, batch.error
    bright, dark = batch.items.order_by("position")
    assert bright.status == BatchItem.Status.FAILED and "not a finite number" in bright.error
    assert bright.prediction is None
    assert dark.status == BatchItem.Status.DONE and math.isfinite(dark.prediction.confidence)


@pytest.mark.django_db(transaction=True)
def test_a_batch_whose_task_keeps_failing_is_failed_after_the_attempts_with_the_error(
    technologist, tiny_record, settings
):
    settings.WBC_BATCH_MAX_ATTEMPTS = 3
    batch = submit_batch(technologist, [NamedBytes("c.png", image_bytes())], tiny_record, name="Legacy override")
    # A row stored before the rule existed: the worker cannot build the classifier for it, every time.
    Batch.objects.filter(pk=batch.pk).update(normalization=TINY_STD)
    call_command("run_worker", "--batch")
    batch.refresh_from_db()
    assert batch.status == Batch.Status.FAILED and batch.finished_at is not None
    assert batch.attempts == 3
    assert "3 attempts" in batch.error and "std" in batch.error
    assert batch.items.get().status == BatchItem.Status.PENDING  # the image is kept, never silently dropped
    call_command("run_worker", "--batch")  # nothing left to do, nothing re-queued
    batch.refresh_from_db()
    assert batch.status == Batch.Status.FAILED and batch.attempts == 3


@pytest.mark.django_db(transaction=True)
def test_a_failed_chunk_is_tried_again_after_a_back_off_that_doubles(technologist, tiny_record, settings):
    from django_tasks_db.models import DBTaskResult

    settings.WBC_BATCH_MAX_ATTEMPTS, settings.WBC_BATCH_RETRY_SECONDS = 3, 60
    batch = submit_batch(technologist, [NamedBytes("c.png", image_bytes())], tiny_record, name="Backed off")
    Batch.objects.filter(pk=batch.pk).update(normalization=TINY_STD)  # fails every time, as above
    for attempt, delay in ((1, 60), (2, 120)):
        call_command("run_worker", "--batch")
        batch.refresh_from_db()
        assert batch.status == Batch.Status.RUNNING and batch.attempts == attempt, batch.error
        waiting = DBTaskResult.objects.get(status="READY")
        assert delay - 30 < (waiting.run_after - timezone.now()).total_seconds() <= delay
        call_command("run_worker", "--batch")  # too early: the retry waits for its time
        batch.refresh_from_db()
        assert batch.attempts == attempt
        DBTaskResult.objects.filter(pk=waiting.pk).update(run_after=timezone.now())  # its time has come
    call_command("run_worker", "--batch")
    batch.refresh_from_db()
    assert batch.status == Batch.Status.FAILED and batch.attempts == 3
