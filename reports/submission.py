"""Submitting a slide (batch): files, zip archives and URLs checked, stored and queued, with nothing half-stored.

URLs are not downloaded here: a submit answers at once, whatever the remote servers do. Each URL is checked by
its form (scheme, no credentials, no literal private address) and stored as a pending item for the worker to
fetch (:mod:`reports.url_items`); a URL refused by its form is a failed item with the reason.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from classifier.fetch import UrlRefused, check_url_form, url_file_name, url_without_credentials
from classifier.models import ClassifierModel
from wbc_ml.preprocessing import ImageRejected, decode_image, open_image

from .bundles import discard_bundles, save_bundle
from .chunks import enqueue_chunks, ensure_chunks, make_chunks, planned_chunks
from .models import Batch, BatchChunk, BatchItem
from .uploads import Limits, NamedBytes, UploadRefused


def batch_limits() -> Limits:
    return Limits(
        max_files=settings.WBC_BATCH_MAX_FILES,
        max_total_bytes=settings.WBC_BATCH_MAX_BYTES,
        max_file_bytes=settings.WBC_MAX_IMAGE_BYTES,
        max_zip_ratio=settings.WBC_ZIP_MAX_RATIO,
    )


@dataclass(frozen=True)
class UrlEntry:
    """A URL of a batch: the item's name, the URL for the worker (never with credentials), or why it was refused."""

    name: str
    url: str
    error: str = ""


def url_entries(urls: list[str], *, name_by_url: bool = False) -> list[UrlEntry]:
    """Each URL becomes an entry; a refused URL is a failed entry with its reason, not a failed batch.

    Entries are named by the file name in the URL (the batch page), or by the URL itself without any
    ``user:password@`` (the API, so the LIS finds its own URLs in the results). Nothing is downloaded here.
    """
    if len(urls) > settings.WBC_BATCH_MAX_URLS:
        raise UploadRefused(f"Too many URLs: at most {settings.WBC_BATCH_MAX_URLS} per batch.")
    entries = []
    for url in urls:
        clean = url_without_credentials(url)
        name = clean if name_by_url else url_file_name(clean)
        try:
            check_url_form(url, allowed_private_hosts=frozenset(settings.WBC_URL_ALLOWED_PRIVATE_HOSTS))
        except UrlRefused as exc:
            entries.append(UrlEntry(clean, "", str(exc)))
        else:
            entries.append(UrlEntry(name, clean))
    return entries


def checked_upload(entry: NamedBytes | UrlEntry, *, decode: bool = False) -> NamedBytes | UrlEntry:
    """Check an upload, keeping its bytes when it is good, else its reason.

    A batch image gets every check that needs no decoding (:func:`~wbc_ml.preprocessing.open_image`): the worker
    decodes it anyway and fails a damaged one with its reason, so decoding it here too cost the web process half a
    millisecond per image for nothing. ``decode=True`` also decodes the pixel stream (at reduced scale), for files
    that are used later without such a step (an adaptation's labelled cells).
    """
    if isinstance(entry, UrlEntry) or entry.data is None:
        return entry
    limits = {"max_bytes": settings.WBC_MAX_IMAGE_BYTES, "max_pixels": settings.WBC_MAX_IMAGE_PIXELS}
    try:
        if decode:
            decode_image(entry.data, name=entry.name, reduced=True, **limits)
        else:
            open_image(entry.data, name=entry.name, **limits)
    except ImageRejected as exc:
        return NamedBytes(entry.name, None, str(exc))
    return entry


def submit_batch(
    user,
    entries: list[NamedBytes | UrlEntry],
    model_record: ClassifierModel,
    *,
    name: str,
    external_id: str = "",
    threshold: float | None = None,
    idempotency_key: str = "",
    normalization: dict | None = None,
) -> Batch:
    """Store a batch and its images (bad files as failed items with their reason) and enqueue its chunks.

    A chunk's images are stored as one bundle (:mod:`reports.bundles`) that its worker unpacks into the items' own
    files; a URL entry becomes a pending item without an image, for the worker to download.
    """
    uid = uuid.uuid4()
    checked = [checked_upload(entry) for entry in entries]
    pending = [position for position, entry in enumerate(checked) if _is_pending(entry)]
    bundles: list[str] = []
    try:
        for index, (first, end) in enumerate(planned_chunks(pending)):
            bundles.append(_store_bundle(f"{uid}-{index}.zip", checked, range(first, end)))
        with transaction.atomic():
            batch = Batch.objects.create(
                uid=uid,
                laboratory_id=user.laboratory_id,
                user=user,
                name=name[:200],
                external_id=external_id[:100],
                model=model_record,
                normalization=normalization or {},
                threshold=threshold if threshold is not None else user.review_threshold,
                idempotency_key=idempotency_key,
            )
            BatchItem.objects.bulk_create(_item(batch, position, entry) for position, entry in enumerate(checked))
            if not pending:
                batch.status, batch.finished_at = Batch.Status.DONE, timezone.now()
                batch.save(update_fields=["status", "finished_at"])
            else:
                chunk_ids = [chunk.pk for chunk in make_chunks(batch, pending, bundles)]
                transaction.on_commit(lambda: enqueue_chunks(chunk_ids))
    except BaseException:
        discard_bundles(filter(None, bundles))  # nothing half-stored
        raise
    return batch


def _is_pending(entry: NamedBytes | UrlEntry) -> bool:
    return not entry.error and (bool(entry.url) if isinstance(entry, UrlEntry) else entry.data is not None)


def _store_bundle(name: str, checked: list[NamedBytes | UrlEntry], positions: range) -> str:
    """One chunk's uploaded images in one stored zip; "" for a chunk of URLs only."""
    contents = [(p, checked[p].data) for p in positions if isinstance(checked[p], NamedBytes) and checked[p].data]
    return save_bundle(name, contents) if contents else ""


def _item(batch: Batch, position: int, entry: NamedBytes | UrlEntry) -> BatchItem:
    item = BatchItem(batch=batch, position=position, original_filename=entry.name[-255:])
    if isinstance(entry, UrlEntry):
        item.source_url = entry.url[:2000]
    if not _is_pending(entry):
        item.status, item.error = BatchItem.Status.FAILED, entry.error[:500]
    return item


def enqueue(batch: Batch) -> None:
    """Queue one task for each queued chunk of ``batch`` (its chunks are made first if it has none, e.g. a re-run)."""
    ensure_chunks(batch)
    enqueue_chunks(list(batch.chunks.filter(status=BatchChunk.Status.QUEUED).values_list("pk", flat=True)))
