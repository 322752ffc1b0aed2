"""A submission's images stored as one zip per chunk (a *bundle*), which the worker that takes the chunk unpacks.

Submitting used to write one file per image in the request. On S3 that is one PutObject each: 20 slides of 100
cells sent at once queued 2,000 uploads behind the request threads (``benchmarks/load.py``: submit p95 13 s and
client time-outs against moto), and on a folder the writes were about a quarter of the web's CPU per submission.
Now a submission writes one uncompressed zip per chunk (JPEG and PNG do not compress further), members named by
the item's position; its items wait without an image.

The worker that holds the chunk reads its bundle once, stores each image as the item's own file (written where
every other reader looks for it: review pages, Grad-CAM, re-runs, the LIS), links them all in one transaction
under its lease, clears the chunk's bundle there and deletes the zip after the commit; it classifies from the
bytes it already has. A worker that lost its lease deletes the files it wrote and leaves the bundle to the holder.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Iterable

from django.core.files.base import ContentFile
from django.db import transaction
from django.db.models import Case, CharField, Value, When

from wbc_ml.preprocessing import sniff_image_type

from .chunks import ChunkLease
from .file_pool import write_each
from .models import Batch, BatchChunk, BatchItem, worker_file_name

logger = logging.getLogger(__name__)
BUNDLE = BatchChunk._meta.get_field("bundle")
IMAGE = BatchItem._meta.get_field("image")
MISSING = "{name}: the uploaded image is missing from its stored upload; submit it again."


def save_bundle(name: str, contents: Iterable[tuple[int, bytes]]) -> str:
    """Store (position, image bytes) as one uncompressed zip under ``name`` (in the bundle field's folder); the name
    it was stored under."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for position, data in contents:
            archive.writestr(str(position), data)
    return BUNDLE.storage.save(BUNDLE.generate_filename(None, name), ContentFile(buffer.getvalue()))


def discard_bundles(names: Iterable[str]) -> None:
    """Delete stored bundles (unpacked, or of a submission that failed); one that cannot be deleted is logged."""
    _delete(BUNDLE.storage, names)


def read_bundle(name: str) -> dict[int, bytes]:
    """The images of a stored bundle, by position."""
    with BUNDLE.storage.open(name, "rb") as handle:
        data = handle.read()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {int(member.filename): archive.read(member) for member in archive.infolist()}


def stored_contents(batch: Batch) -> dict[int, bytes]:
    """Each item's stored image by position: its own file, or its chunk's bundle while that is not unpacked yet.

    Items are read before bundles: one unpacked in between is then missing here, never read from a deleted zip.
    """
    contents = {}
    for item in batch.items.exclude(image=""):
        with item.image.open("rb") as handle:
            contents[item.position] = handle.read()
    for name in batch.chunks.exclude(bundle="").values_list("bundle", flat=True):
        try:
            bundled = read_bundle(name)
        except FileNotFoundError:  # unpacked (and deleted) meanwhile
            continue
        contents.update({position: data for position, data in bundled.items() if position not in contents})
    return contents


def unpack_chunk(chunk: BatchChunk, items, lease: ChunkLease) -> dict[int, bytes] | None:
    """Store each bundled image of the chunk as its item's own file; {item pk: bytes} of those stored, or None when
    the lease was lost (nothing stored). ``items`` is the chunk's queryset of items."""
    if not chunk.bundle:
        return {}
    waiting = list(items.filter(status=BatchItem.Status.PENDING, image="", source_url="").order_by("position"))
    bundled = read_bundle(chunk.bundle.name)
    todo = [(item, bundled[item.position]) for item in waiting if item.position in bundled]
    missing = [item for item in waiting if item.position not in bundled]
    names = _write_images(chunk.batch.uid, todo)
    with transaction.atomic():
        # Locks the chunk's row until the commit, as storing results does: a worker taking over waits for this.
        held = BatchChunk.objects.select_for_update().filter(pk=lease.chunk_id, lease=lease.lease).exists()
        if held:
            _link(todo, names, missing)
            BatchChunk.objects.filter(pk=chunk.pk).update(bundle="")
            transaction.on_commit(lambda: discard_bundles([chunk.bundle.name]))
    if not held:
        _delete(IMAGE.storage, names)
        return None
    return {item.pk: data for item, data in todo}


def _write_images(uid, todo: list[tuple[BatchItem, bytes]]) -> list[str]:
    """Write each image as a file of its own (on the file pool for S3); every one written is deleted again if any
    write fails."""
    written: list[str] = []  # list.append is thread-safe

    def write(_: int, pair: tuple[BatchItem, bytes]) -> str:
        item, data = pair
        suffix = ".png" if sniff_image_type(data) == "PNG" else ".jpg"
        name = IMAGE.storage.save(worker_file_name("image", f"{uid}-{item.position}", suffix), ContentFile(data))
        written.append(name)
        return name

    try:
        return write_each(write, todo, IMAGE.storage)
    except BaseException:
        _delete(IMAGE.storage, written)
        raise


def _link(todo: list[tuple[BatchItem, bytes]], names: list[str], missing: list[BatchItem]) -> None:
    """One UPDATE gives each item its file; an item whose image is not in the bundle fails with the reason."""
    if todo:
        whens = [When(pk=item.pk, then=Value(name)) for (item, _), name in zip(todo, names, strict=True)]
        BatchItem.objects.filter(pk__in=[item.pk for item, _ in todo]).update(
            image=Case(*whens, output_field=CharField())
        )
    for item in missing:
        BatchItem.objects.filter(pk=item.pk, status=BatchItem.Status.PENDING).update(
            status=BatchItem.Status.FAILED, error=MISSING.format(name=item.original_filename)[:500]
        )


def _delete(storage, names: Iterable[str]) -> None:
    for name in names:
        try:
            storage.delete(name)
        except OSError as exc:  # a leftover file is logged; the outcome that matters is already decided
            logger.warning("could not delete %s: %s", name, exc)
