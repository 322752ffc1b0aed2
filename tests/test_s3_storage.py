"""With the S3 settings every file goes through STORAGES into the bucket: batch images, thumbnails, saliency maps, and
uploaded model files with their ONNX copies. Another host serves a model from the bucket through its own cache,
checked by sha256; a tampered object is refused. Against a real S3 API on loopback (moto in server mode, tests/s3.py)
and a real worker process."""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from PIL import Image

from classifier.models import ClassifierModel, Prediction
from classifier.registry import ensure_onnx
from reports.models import Batch, BatchItem
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from tests.conftest import build_tiny_model, image_bytes, start_worker
from tests.workers import stop_worker, wait_until_finished
from wbc_ml.checksums import file_sha256
from wbc_ml.datasets import WBC_CLASSES
from wbc_ml.inference import clear_cache

pytestmark = pytest.mark.django_db(transaction=True)


def _files(folder: Path) -> list[Path]:
    return [path for path in Path(folder).rglob("*") if path.is_file()] if Path(folder).exists() else []


@pytest.fixture
def local_folders(settings, tmp_path) -> dict[str, Path]:
    """The folders a host would use without S3: with S3 they must stay empty."""
    settings.WBC_CUSTOM_MODELS_DIR = tmp_path / "custom-models"
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    settings.WBC_MODEL_CACHE_DIR = tmp_path / "host-1-cache"
    return {"media": Path(settings.MEDIA_ROOT), "custom": tmp_path / "custom-models", "onnx": tmp_path / "onnx"}


def test_a_batch_is_classified_by_a_worker_with_every_file_in_s3(
    s3_media, technologist, tiny_record, models_dir, settings, tmp_path, local_folders
):
    ensure_onnx(tiny_record)  # a bundled model's ONNX copy goes to the bucket, for every host
    tiny_record.refresh_from_db()
    assert tiny_record.onnx_sha256, tiny_record.onnx_status
    onnx_key = f"models/onnx/{tiny_record.onnx_file_name}"
    assert s3_media.keys("models/") == [onnx_key]
    assert hashlib.sha256(s3_media.read(onnx_key)).hexdigest() == tiny_record.onnx_sha256

    entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(30 * i, 120, 200 - 10 * i))) for i in range(5)]
    batch = submit_batch(technologist, entries, tiny_record, name="Slide on S3")
    worker_folders = {name: tmp_path / f"worker-{name}" for name in ("media", "cache", "onnx", "custom")}
    worker = start_worker(
        settings,
        models_dir,
        **s3_media.env,
        MEDIA_ROOT=str(worker_folders["media"]),
        WBC_MODEL_CACHE_DIR=str(worker_folders["cache"]),  # another host: its own, empty cache
        WBC_ONNX_DIR=str(worker_folders["onnx"]),
        WBC_CUSTOM_MODELS_DIR=str(worker_folders["custom"]),
    )
    try:
        batch = wait_until_finished(batch, worker)
    finally:
        output = stop_worker(worker)
    assert batch.status == Batch.Status.DONE, output

    items = list(batch.items.select_related("prediction").order_by("position"))
    assert [item.status for item in items] == [BatchItem.Status.DONE] * len(entries)
    keys = set(s3_media.keys())
    for item, entry in zip(items, entries, strict=True):
        assert item.image.name in keys and s3_media.read(item.image.name) == entry.data
        assert item.prediction.image.name == item.image.name  # the prediction names the stored file, no copy
        assert item.thumbnail.name in keys
        assert Image.open(io.BytesIO(s3_media.read(item.thumbnail.name))).format == "JPEG"
        assert item.prediction.model_sha256 == tiny_record.sha256
    assert s3_media.keys("bundles/") == []  # the submission's bundle, deleted once unpacked
    # the worker served the ONNX copy it fetched into its own cache, checked against the registered sha256
    cached = worker_folders["cache"] / "onnx" / tiny_record.onnx_file_name
    assert file_sha256(cached) == tiny_record.onnx_sha256
    for folder in (*local_folders.values(), worker_folders["media"], worker_folders["onnx"], worker_folders["custom"]):
        assert _files(folder) == [], folder


def test_a_media_upload_is_one_put_without_a_head_request(s3_media):
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    data = image_bytes()
    calls: list[str] = []
    events = default_storage.connection.meta.client.meta.events
    events.register("before-call.s3", lambda model, **_: calls.append(model.name), unique_id="count-s3-calls")
    try:
        name = default_storage.save(f"batches/{uuid.uuid4()}-0.png", ContentFile(data))
    finally:
        events.unregister("before-call.s3", unique_id="count-s3-calls")
    assert calls == ["PutObject"]
    assert s3_media.read(name) == data


def test_a_submission_is_one_put_per_chunk_whatever_its_number_of_images(s3_media, technologist, tiny_record, settings):
    from django.core.files.storage import default_storage

    settings.WBC_CHUNK_SIZE = 4
    entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(20 * i, 90, 160))) for i in range(8)]
    calls: list[str] = []
    events = default_storage.connection.meta.client.meta.events
    events.register("before-call.s3", lambda model, **_: calls.append(model.name), unique_id="count-s3-calls")
    try:
        batch = submit_batch(technologist, entries, tiny_record, name="Two chunks")
    finally:
        events.unregister("before-call.s3", unique_id="count-s3-calls")
    assert calls == ["PutObject", "PutObject"]  # it was one per image
    assert s3_media.keys() == sorted(batch.chunks.values_list("bundle", flat=True))


def test_a_worker_that_lost_its_chunk_never_deletes_the_file_of_the_worker_that_took_it(
    s3_media, technologist, tiny_record
):
    from reports.chunks import ChunkLease
    from reports.models import BatchChunk
    from reports.submission import UrlEntry
    from reports.url_items import record_download

    batch = submit_batch(technologist, [UrlEntry("cell.png", "https://example.org/cell.png")], tiny_record, name="URL")
    item, chunk = batch.items.get(), BatchChunk.objects.get(batch=batch)
    taken_over = ChunkLease(chunk.pk, uuid.uuid4())
    BatchChunk.objects.filter(pk=chunk.pk).update(lease=taken_over.lease)
    data = image_bytes()
    assert record_download(batch, taken_over, item, ("cell.png", data))  # the holder stores it
    lost = ChunkLease(chunk.pk, uuid.uuid4())
    assert not record_download(batch, lost, item, ("cell.png", data))  # the lost one deletes only its own file
    item.refresh_from_db()
    assert s3_media.keys("batches/") == [item.image.name] and s3_media.read(item.image.name) == data


def test_a_saliency_map_is_made_and_stored_in_s3(s3_media, tech_client, tiny_record, local_folders):
    upload = SimpleUploadedFile("cell.png", image_bytes(size=(72, 64)), content_type="image/png")
    response = tech_client.post(reverse("classifier:classify"), {"image": upload, "model": tiny_record.pk})
    assert response.status_code == 302, response.content[-1000:]
    prediction = Prediction.objects.get()
    assert s3_media.read(prediction.image.name) == image_bytes(size=(72, 64))

    response = tech_client.get(reverse("classifier:saliency", args=[prediction.uid, "gradcam"]))
    assert response.status_code == 200
    served = b"".join(response.streaming_content)
    prediction.refresh_from_db()
    assert prediction.gradcam.name.startswith(f"saliency/{prediction.laboratory_id}/")
    assert s3_media.read(prediction.gradcam.name) == served
    assert Image.open(io.BytesIO(served)).size == (72, 64)
    image = tech_client.get(reverse("classifier:prediction_image", args=[prediction.uid]))
    assert b"".join(image.streaming_content) == image_bytes(size=(72, 64))  # read back from the bucket
    assert _files(local_folders["media"]) == []


MODEL_FORM = {"name": "Lab CNN on S3", "class_order": ", ".join(WBC_CLASSES), "normalization": "scale01"}


def _upload_model(client, path: Path):
    upload = SimpleUploadedFile("model.keras", path.read_bytes())
    return client.post(reverse("classifier:model_upload"), {**MODEL_FORM, "file": upload})


def _classify(client, record) -> int:
    upload = SimpleUploadedFile("cell.png", image_bytes(), content_type="image/png")
    return client.post(reverse("classifier:classify"), {"image": upload, "model": record.pk}).status_code


def test_an_uploaded_model_is_stored_in_s3_and_another_host_serves_it_from_its_checked_cache(
    s3_media, client, model_admin, settings, tmp_path, local_folders
):
    model = tmp_path / "lab.keras"
    build_tiny_model(model, seed=21)
    client.force_login(model_admin)
    response = _upload_model(client, model)
    assert response.status_code == 302, response.content[-1500:]
    record = ClassifierModel.objects.get(is_bundled=False)
    model_key, onnx_key = f"models/uploads/{record.file_name}", f"models/onnx/{record.onnx_file_name}"
    assert s3_media.keys("models/") == sorted([model_key, onnx_key])
    assert hashlib.sha256(s3_media.read(model_key)).hexdigest() == record.sha256 == file_sha256(model)
    assert hashlib.sha256(s3_media.read(onnx_key)).hexdigest() == record.onnx_sha256
    assert _files(local_folders["custom"]) == [] and _files(local_folders["onnx"]) == []

    # Host 2: nothing cached yet. It fetches both files from the bucket, checks them and classifies.
    host_2 = tmp_path / "host-2-cache"
    settings.WBC_MODEL_CACHE_DIR = host_2
    clear_cache()
    assert _classify(client, record) == 302
    assert Prediction.objects.get().model_sha256 == record.sha256
    cached_onnx = host_2 / "onnx" / record.onnx_file_name
    assert file_sha256(cached_onnx) == record.onnx_sha256
    assert file_sha256(host_2 / "models" / record.file_name) == record.sha256

    # A damaged cached copy is never used: it is fetched again from the bucket.
    cached_onnx.write_bytes(b"damaged on this host's disk")
    clear_cache()
    assert _classify(client, record) == 302
    assert file_sha256(cached_onnx) == record.onnx_sha256

    # Host 3, after someone altered the object in the bucket: refused, not served, and nothing kept.
    altered = bytearray(s3_media.read(onnx_key))
    altered[-8] ^= 0xFF
    s3_media.write(onnx_key, bytes(altered))
    settings.WBC_MODEL_CACHE_DIR = tmp_path / "host-3-cache"
    clear_cache()
    response = client.post(
        reverse("classifier:classify"),
        {"image": SimpleUploadedFile("cell.png", image_bytes(), content_type="image/png"), "model": record.pk},
    )
    assert response.status_code == 503
    assert "does not match its registered checksum in the model storage" in response.content.decode()
    assert Prediction.objects.count() == 2
    assert _files(tmp_path / "host-3-cache" / "onnx") == []  # the fetched copy was not kept


def test_an_upload_that_cannot_be_stored_leaves_nothing_in_the_bucket(
    s3_media, client, model_admin, settings, tmp_path, local_folders
):
    model = tmp_path / "lab.keras"
    build_tiny_model(model, seed=22)
    storages = {**settings.STORAGES}
    storages["onnx"] = {**storages["onnx"], "OPTIONS": {**storages["onnx"]["OPTIONS"], "bucket_name": "no-such-bucket"}}
    settings.STORAGES = storages  # the model file is stored, then its ONNX copy cannot be
    client.force_login(model_admin)
    response = _upload_model(client, model)
    assert response.status_code == 400
    assert "passed its checks but could not be stored" in response.content.decode()
    assert s3_media.keys() == []  # the model file stored first was removed again
    assert not ClassifierModel.objects.filter(is_bundled=False).exists()
