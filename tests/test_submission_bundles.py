"""A submission stores one zip (bundle) per chunk; the worker holding the chunk gives each image its own file."""

from __future__ import annotations

import io
import uuid
import zipfile
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from reports.bundles import unpack_chunk
from reports.chunks import ChunkLease
from reports.models import BatchChunk, BatchItem
from reports.submission import UrlEntry, submit_batch
from reports.uploads import NamedBytes
from reports.worker import process_batch_now
from tests.conftest import image_bytes

pytestmark = pytest.mark.django_db(transaction=True)


def _media(settings, folder: str) -> list[Path]:
    root = Path(settings.MEDIA_ROOT) / folder
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


def _cells(n: int) -> list[NamedBytes]:
    return [NamedBytes(f"cell{i}.png", image_bytes(color=(50 * i, 100, 180))) for i in range(n)]


def test_a_submission_writes_one_bundle_per_chunk_and_the_worker_gives_each_image_its_own_file(
    settings, technologist, tiny_record
):
    settings.WBC_CHUNK_SIZE = 2
    entries = [*_cells(3), NamedBytes("notes.jpg", b"not an image"), UrlEntry("far.png", "https://example.org/far.png")]
    batch = submit_batch(technologist, entries, tiny_record, name="Bundled")

    chunks = list(batch.chunks.order_by("index"))
    assert len(chunks) == 2 and len(_media(settings, "bundles")) == 2 and _media(settings, "batches") == []
    with default_storage.open(chunks[0].bundle.name, "rb") as handle:  # a plain zip, members named by position
        archive = zipfile.ZipFile(io.BytesIO(handle.read()))
    assert {name: archive.read(name) for name in archive.namelist()} == {"0": entries[0].data, "1": entries[1].data}
    assert [item.image.name for item in batch.items.all()] == [""] * 5
    refused = batch.items.get(original_filename="notes.jpg")
    assert refused.status == BatchItem.Status.FAILED and refused.error

    settings.WBC_BATCH_URL_BUDGET_SECONDS = 0  # the URL item fails at once: nothing leaves this machine
    assert process_batch_now(batch.pk) == "done"
    cells = list(batch.items.filter(original_filename__startswith="cell").select_related("prediction"))
    for item, entry in zip(sorted(cells, key=lambda i: i.position), entries, strict=False):
        assert item.status == BatchItem.Status.DONE and item.image.name.startswith("batches/")
        with item.image.open("rb") as handle:
            assert handle.read() == entry.data
        assert item.prediction.image.name == item.image.name  # the prediction names the item's file, no copy
    assert _media(settings, "bundles") == [] and set(batch.chunks.values_list("bundle", flat=True)) == {""}


def test_a_worker_that_lost_its_chunk_stores_no_file_and_leaves_the_bundle(settings, technologist, tiny_record):
    batch = submit_batch(technologist, _cells(2), tiny_record, name="Taken over")
    chunk = batch.chunks.get()
    BatchChunk.objects.filter(pk=chunk.pk).update(status=BatchChunk.Status.RUNNING, lease=uuid.uuid4())
    items = batch.items.all()

    assert unpack_chunk(chunk, items, ChunkLease(chunk.pk, uuid.uuid4())) is None
    assert _media(settings, "batches") == [] and len(_media(settings, "bundles")) == 1
    assert set(items.values_list("image", flat=True)) == {""}
    chunk.refresh_from_db()
    assert default_storage.exists(chunk.bundle.name)


def test_an_image_missing_from_its_bundle_fails_with_the_reason_and_the_others_are_classified(
    technologist, tiny_record
):
    batch = submit_batch(technologist, _cells(2), tiny_record, name="Short bundle")
    chunk = batch.chunks.get()
    default_storage.delete(chunk.bundle.name)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("0", image_bytes())
    default_storage.save(chunk.bundle.name, ContentFile(buffer.getvalue()))

    assert process_batch_now(batch.pk) == "done"
    first, second = batch.items.order_by("position")
    assert first.status == BatchItem.Status.DONE
    assert second.status == BatchItem.Status.FAILED and "missing from its stored upload" in second.error
