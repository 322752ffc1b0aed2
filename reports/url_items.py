"""The worker's download of a chunk's image URLs: in parallel, within one time budget.

A URL submitted with a batch is stored as a pending item with ``source_url`` and no image, so the submit never
waits for a remote server. The worker that holds a chunk fetches the chunk's URL items here through the safe
fetcher (the same SSRF rules as everywhere, ``WBC_URL_ALLOWED_PRIVATE_HOSTS`` included): every download gets at
most ``WBC_URL_FETCH_SECONDS`` and never more than what is left of ``WBC_BATCH_URL_BUDGET_SECONDS`` (a batch's
URLs, at most ``WBC_BATCH_MAX_URLS``, come after its files, so they usually share one chunk and its budget). A URL
that fails, or is still waiting when the budget is spent, becomes a failed item with its reason; a fetched image is
stored and the item then waits for classification like an uploaded file. The chunk's lease is renewed while
downloads run, and a worker that lost it stores nothing more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from django.conf import settings
from django.core.files.base import ContentFile

from classifier.fetch import UrlRefused, fetch_url
from wbc_ml.preprocessing import ImageRejected, open_image, sniff_image_type

from .chunks import ChunkLease
from .models import Batch, BatchItem, worker_file_name
from .wakeup import PROGRESS, notify

logger = logging.getLogger(__name__)
URL_FETCHERS = 8  # downloads of one batch at the same time (they mostly wait on the network)


def pending_url_items(items) -> list[BatchItem]:
    """The items (a queryset, e.g. a chunk's) still to download."""
    return list(items.filter(status=BatchItem.Status.PENDING, image="").exclude(source_url="").order_by("position"))


def _download(item: BatchItem, deadline: float, budget: float) -> tuple[str, bytes] | str:
    """(file name, checked image bytes), or the reason the item fails. Runs on the pool: no database here."""
    left = deadline - time.monotonic()
    if left <= 0:
        return f"{item.original_filename}: not downloaded: the batch's {budget:g} seconds for downloading URLs ran out."
    try:
        timeout = max(0.1, round(min(settings.WBC_URL_FETCH_SECONDS, left), 1))  # "3 seconds", not "2.99998"
        name, data = fetch_url(item.source_url, total_timeout=timeout)
        open_image(  # classification decodes it, and fails a damaged one with its reason
            data,
            name=item.original_filename,  # refusals name the item as the user knows it
            max_bytes=settings.WBC_MAX_IMAGE_BYTES,
            max_pixels=settings.WBC_MAX_IMAGE_PIXELS,
        )
    except (UrlRefused, ImageRejected) as exc:
        return str(exc)
    return name, data


def record_download(batch: Batch, lease: ChunkLease, item: BatchItem, outcome: tuple[str, bytes] | str) -> bool:
    """Store one outcome if this worker still holds the chunk; False when the lease is lost."""
    held = BatchItem.objects.filter(lease.held(), pk=item.pk, status=BatchItem.Status.PENDING, image="")
    if isinstance(outcome, str):
        held.update(status=BatchItem.Status.FAILED, error=outcome[:500])
        return lease.is_held()
    _, data = outcome
    field = BatchItem._meta.get_field("image")
    suffix = ".png" if sniff_image_type(data) == "PNG" else ".jpg"
    stored = field.storage.save(worker_file_name("image", f"{batch.uid}-{item.position}", suffix), ContentFile(data))
    if held.update(image=stored) != 1:
        field.storage.delete(stored)  # another worker took over (or the item is gone): nothing half-stored
        return lease.is_held()
    return True


def fetch_url_items(batch: Batch, items, lease: ChunkLease, stopping: Callable[[], bool] = lambda: False) -> bool:
    """Download the pending URL items among ``items`` (the chunk's); False when the lease was lost (stop at once).

    When ``stopping()`` turns true (the worker is shutting down) it returns True at once, leaving the items not yet
    downloaded pending for whoever takes the chunk next.
    """
    items = pending_url_items(items)
    if not items:
        return True
    budget = float(settings.WBC_BATCH_URL_BUDGET_SECONDS)
    deadline = time.monotonic() + budget
    renew_every = max(0.5, settings.WBC_LEASE_SECONDS / 4)
    pool = ThreadPoolExecutor(max_workers=min(URL_FETCHERS, len(items)), thread_name_prefix="url-fetch")
    running: dict[Future, BatchItem] = {pool.submit(_download, item, deadline, budget): item for item in items}
    try:
        while running:
            finished, _ = wait(running, timeout=renew_every, return_when=FIRST_COMPLETED)
            for future in finished:
                if not record_download(batch, lease, running.pop(future), future.result()):
                    return False
            if finished:
                notify(PROGRESS)
            if not lease.renew():
                return False
            if stopping():
                return True
        return True
    finally:
        for future in running:
            future.cancel()
        pool.shutdown(wait=False)  # a download still running ends by its own deadline; its result is dropped
