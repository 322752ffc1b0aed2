"""Small WebP thumbnails of a batch's cells for the review gallery.

The worker makes one per cell while it classifies, from the image it has already decoded, so the gallery never
resizes anything per request. The files are written through ``BatchItem.thumbnail``'s storage inside the chunk's
transaction; :func:`stored_thumbnails` deletes them again if that transaction fails, so a failed chunk leaves
neither rows nor files behind. Items of older batches have no thumbnail: the gallery shows their full image.
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
WEBP_QUALITY = 80
WEBP_METHOD = 2  # encoder effort 0-6: 2 is about three times faster than the default 4, a few percent larger


def make_thumbnail(image: Image.Image, size: int = THUMBNAIL_PX) -> bytes | None:
    """A WebP of at most ``size`` px on the longer side; None (logged) if it cannot be encoded."""
    try:
        small = image.copy()
        # reducing_gap=1.0: a fast box reduction by an integer factor, then bilinear over what is left; at gallery
        # size it looks the same and costs half of what 2.0 costs (the worker makes one per cell).
        small.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=1.0)
        buffer = io.BytesIO()
        small.save(buffer, format="WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
    except (OSError, ValueError) as exc:
        logger.warning("no thumbnail: %s", exc)
        return None
    return buffer.getvalue()


class ThumbnailWriter:
    """Writes thumbnails through the field's storage and remembers them, to link them or to take them back."""

    def __init__(self) -> None:
        self.field = BatchItem._meta.get_field("thumbnail")
        self.names: dict[int, str] = {}

    def save(self, item: BatchItem, data: bytes | None) -> None:
        if not data:
            return
        wanted = worker_file_name("thumbnail", PurePosixPath(item.image.name).stem or str(item.pk), ".webp")
        self.names[item.pk] = self.field.storage.save(wanted, ContentFile(data))

    def column(self) -> Case:
        """The value for ``BatchItem.objects.update(thumbnail=...)``: each saved item gets its own file."""
        whens = [When(pk=pk, then=Value(name)) for pk, name in self.names.items()]
        return Case(*whens, default=F("thumbnail"), output_field=CharField()) if whens else F("thumbnail")

    def discard(self) -> None:
        for name in self.names.values():
            try:
                self.field.storage.delete(name)
            except OSError as exc:  # the original failure matters more than a leftover file
                logger.warning("could not delete thumbnail %s: %s", name, exc)
        self.names.clear()


@contextmanager
def stored_thumbnails() -> Iterator[ThumbnailWriter]:
    """Wrap a transaction with it: if anything in the block fails, every thumbnail saved in it is deleted."""
    writer = ThumbnailWriter()
    try:
        yield writer
    except BaseException:
        writer.discard()
        raise
