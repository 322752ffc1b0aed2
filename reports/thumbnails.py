"""Small JPEG thumbnails of a batch's cells for the review gallery.

The worker makes one per cell while it classifies, from the image it has already decoded, so the gallery never
resizes anything per request. The files are written through ``BatchItem.thumbnail``'s storage just before the
transaction that links them, so no database transaction or row lock is held while they are written (on S3 a round
trip each, retried through an outage); :func:`stored_thumbnails` deletes them again if that transaction fails or
does not link them, so a failed chunk leaves neither rows nor files behind. Items of older batches have no thumbnail:
the gallery shows their full image; those made before JPEG are WebP files, served with their own type.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath

from django.core.files.base import ContentFile
from django.db.models import Case, CharField, F, Value, When
from PIL import Image

from .models import BatchItem, worker_file_name

logger = logging.getLogger(__name__)
THUMBNAIL_PX = 96  # the longer side, in pixels
# JPEG, not WebP: at 96 px a WebP took 0.6 ms of the worker's CPU per cell to encode, a JPEG 0.07 ms (about 2.8 kB
# instead of 1.4 kB, nothing for a gallery of a hundred cells).
JPEG_QUALITY = 85
SUFFIX = ".jpg"


def make_thumbnail(image: Image.Image, size: int = THUMBNAIL_PX) -> bytes | None:
    """A JPEG of at most ``size`` px on the longer side, in the image's proportions; None (logged) if it cannot be
    encoded."""
    try:
        scale = size / max(image.size)
        dimensions = tuple(max(1, round(side * scale)) for side in image.size) if scale < 1 else image.size
        # reducing_gap=1.0: a fast box reduction by an integer factor, then bilinear over what is left; at gallery
        # size it looks the same and costs half of what 2.0 costs (the worker makes one per cell).
        small = image.resize(dimensions, Image.Resampling.BILINEAR, reducing_gap=1.0)
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    except (OSError, ValueError) as exc:
        logger.warning("no thumbnail: %s", exc)
        return None
    return buffer.getvalue()


def content_type(name: str) -> str:
    """The Content-Type of a stored thumbnail: JPEG now, WebP for those made before."""
    return "image/webp" if name.lower().endswith(".webp") else "image/jpeg"


class ThumbnailWriter:
    """Writes thumbnails through the field's storage and remembers them, to link them or to take them back."""

    def __init__(self) -> None:
        self.field = BatchItem._meta.get_field("thumbnail")
        self.names: dict[int, str] = {}

    def save_all(self, thumbnails: list[tuple[BatchItem, bytes | None]]) -> None:
        """Write each item's thumbnail (none for an item without one), remembering every file written.

        One after another: on S3, writing them on the file pool beside the decoding of the next sub-batches gave no
        more throughput under ``benchmarks/load.py`` (moto shares the cores), and a little less in 2 runs of 2."""
        for item, data in thumbnails:
            if data:
                wanted = worker_file_name("thumbnail", PurePosixPath(item.image.name).stem or str(item.pk), SUFFIX)
                self.names[item.pk] = self.field.storage.save(wanted, ContentFile(data))

    def keep_only(self, pks: set[int]) -> None:
        """Delete the thumbnails written for items other than ``pks`` (they are not linked after all)."""
        self._delete([name for pk, name in self.names.items() if pk not in pks])
        self.names = {pk: name for pk, name in self.names.items() if pk in pks}

    def column(self) -> Case:
        """The value for ``BatchItem.objects.update(thumbnail=...)``: each saved item gets its own file."""
        whens = [When(pk=pk, then=Value(name)) for pk, name in self.names.items()]
        return Case(*whens, default=F("thumbnail"), output_field=CharField()) if whens else F("thumbnail")

    def discard(self) -> None:
        self.keep_only(set())

    def _delete(self, names) -> None:
        for name in names:
            try:
                self.field.storage.delete(name)
            except OSError as exc:  # the original failure matters more than a leftover file
                logger.warning("could not delete thumbnail %s: %s", name, exc)


@contextmanager
def stored_thumbnails() -> Iterator[ThumbnailWriter]:
    """Wrap the writes and the transaction that links them: if anything in the block fails, every thumbnail saved in
    it is deleted."""
    writer = ThumbnailWriter()
    try:
        yield writer
    except BaseException:
        writer.discard()
        raise
