"""The review gallery's thumbnails: small JPEGs made once by the worker while it classifies."""

import io
import uuid

import pytest
from django.db import DatabaseError, connection
from PIL import Image

from classifier.models import Prediction
from reports import worker
from reports.models import BatchChunk, BatchItem
from reports.submission import submit_batch
from reports.thumbnails import THUMBNAIL_PX, make_thumbnail
from reports.uploads import NamedBytes
from reports.worker import process_batch_now
from tests.conftest import image_bytes
from tests.workers import after_each_stored_part
from wbc_ml.preprocessing import decode_image

pytestmark = pytest.mark.django_db(transaction=True)


def _media_files(settings, folder: str) -> list:
    root = settings.MEDIA_ROOT / folder
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_a_thumbnail_is_a_small_jpeg_with_the_image_proportions():
    image = decode_image(image_bytes(size=(360, 240), fmt="JPEG"), name="wide.jpg")
    data = make_thumbnail(image)
    thumbnail = Image.open(io.BytesIO(data))
    assert thumbnail.format == "JPEG"
    assert thumbnail.size == (THUMBNAIL_PX, 64)  # 360×240 keeps its 3:2 shape
    assert len(data) < 6_000
    assert image.size == (360, 240)  # the decoded image the model needs is left untouched


def test_the_worker_stores_one_thumbnail_per_classified_cell(technologist, tiny_record, settings):
    entries = [NamedBytes(f"cell{i}.png", image_bytes(size=(120, 110), color=(40 * i, 90, 200))) for i in range(3)]
    whole = image_bytes(size=(120, 110))
    entries.append(NamedBytes("damaged.png", whole[: len(whole) // 2]))  # passes the upload's checks, not decoding
    batch = submit_batch(technologist, entries, tiny_record, name="Slide with thumbnails")
    damaged = batch.items.get(original_filename="damaged.png")

    assert process_batch_now(batch.pk) == "done"

    done = list(batch.items.filter(status=BatchItem.Status.DONE).order_by("position"))
    assert len(done) == 3
    for item in done:
        assert item.thumbnail.name.startswith("thumbnails/") and item.thumbnail.name.endswith(".jpg")
        with item.thumbnail.open("rb") as handle:
            thumbnail = Image.open(handle)
            thumbnail.load()
        assert thumbnail.format == "JPEG" and thumbnail.size == (THUMBNAIL_PX, 88)
        with item.image.open("rb") as handle:
            assert Image.open(handle).size == (120, 110)  # the original stays as it was uploaded
    damaged.refresh_from_db()
    assert damaged.status == BatchItem.Status.FAILED and not damaged.thumbnail
    assert len(_media_files(settings, "thumbnails")) == 3


def test_the_gallery_serves_each_thumbnail_with_its_own_type(client, technologist, tiny_record):
    from django.core.files.base import ContentFile
    from django.urls import reverse

    batch = submit_batch(technologist, [NamedBytes("cell.png", image_bytes(size=(120, 110)))], tiny_record, name="S")
    assert process_batch_now(batch.pk) == "done"
    item = batch.items.get()
    client.force_login(technologist)
    url = reverse("reports:cell_thumb", args=[batch.uid, item.pk])
    response = client.get(url)
    assert response["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(b"".join(response.streaming_content))).format == "JPEG"

    webp = io.BytesIO()
    Image.new("RGB", (96, 88), (200, 120, 160)).save(webp, format="WEBP")
    item.thumbnail.save("older.webp", ContentFile(webp.getvalue()))  # a thumbnail made before JPEG
    assert client.get(url)["Content-Type"] == "image/webp"


def _refuse_linking_items():
    """A real database trigger that fails the UPDATE linking items to their predictions."""
    if connection.vendor == "postgresql":
        statements = [
            "CREATE FUNCTION refuse_link() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'storage refused'; END; "
            "$$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_link BEFORE UPDATE OF prediction_id ON reports_batchitem "
            "FOR EACH ROW EXECUTE FUNCTION refuse_link()",
        ]
    else:
        statements = [
            "CREATE TRIGGER refuse_link BEFORE UPDATE OF prediction_id ON reports_batchitem "
            "BEGIN SELECT RAISE(ABORT, 'storage refused'); END"
        ]
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def _allow_linking_items():
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("DROP TRIGGER refuse_link ON reports_batchitem")
            cursor.execute("DROP FUNCTION refuse_link()")
        else:
            cursor.execute("DROP TRIGGER refuse_link")


def test_a_chunk_that_fails_to_store_leaves_no_thumbnail_files_and_no_results(technologist, tiny_record, settings):
    entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(50 * i, 80, 190))) for i in range(3)]
    batch = submit_batch(technologist, entries, tiny_record, name="Refused by the database")
    _refuse_linking_items()
    try:
        with pytest.raises(DatabaseError, match="storage refused"):
            process_batch_now(batch.pk)
    finally:
        _allow_linking_items()
    assert _media_files(settings, "thumbnails") == []
    assert Prediction.objects.count() == 0
    assert not batch.items.exclude(thumbnail="").exists()
    assert batch.items.filter(status=BatchItem.Status.PENDING).count() == 3

    # The failed chunk went back to the queue: the next worker finishes the batch with every thumbnail.
    assert process_batch_now(batch.pk) == "done"
    assert len(_media_files(settings, "thumbnails")) == 3
    assert batch.items.exclude(thumbnail="").count() == 3


def test_thumbnails_are_written_before_the_transaction_that_links_them(technologist, tiny_record, monkeypatch):
    """No database transaction (and no lock on the chunk's row) waits while the storage writes: on S3 that is a
    network round trip per cell, retried through an outage."""
    storage = BatchItem._meta.get_field("thumbnail").storage
    real_save, in_transaction = storage.save, []

    def watched_save(name, content, **kwargs):
        in_transaction.append(connection.in_atomic_block)
        return real_save(name, content, **kwargs)

    entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(60 * i, 80, 190))) for i in range(3)]
    batch = submit_batch(technologist, entries, tiny_record, name="Written first")
    monkeypatch.setattr(storage, "save", watched_save)

    assert process_batch_now(batch.pk) == "done"

    assert len(in_transaction) == 6  # each cell's image (unpacked from the submission's bundle), then its thumbnail
    assert not any(in_transaction)
    assert batch.items.filter(status=BatchItem.Status.DONE).exclude(thumbnail="").count() == 3


def test_a_worker_that_lost_its_chunk_leaves_no_thumbnail_of_the_cells_it_did_not_store(
    technologist, tiny_record, settings, monkeypatch
):
    entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(30 * i, 90, 170))) for i in range(7)]
    batch = submit_batch(technologist, entries, tiny_record, name="Taken over")
    chunk = batch.chunks.get()
    monkeypatch.setattr(worker, "SUB_BATCH", 2)
    # another worker takes the chunk over as soon as the first sub-batch is stored
    after_each_stored_part(monkeypatch, lambda: BatchChunk.objects.filter(pk=chunk.pk).update(lease=uuid.uuid4()))

    assert worker.process_chunk_now(chunk.pk) == worker.LOST

    linked = {item.thumbnail.name for item in batch.items.exclude(thumbnail="")}
    assert len(linked) == 2  # the first sub-batch only; the second was written, then found the lease gone
    assert {str(p.relative_to(settings.MEDIA_ROOT)) for p in _media_files(settings, "thumbnails")} == linked
