"""Signals that apps above reports (such as lis) listen to, so that reports never imports them."""

from __future__ import annotations

import logging

from django.dispatch import Signal

from .models import Batch

logger = logging.getLogger(__name__)

# Sent once, by the worker that finished the batch (status DONE), after that change is committed.
# Keyword arguments: sender=Batch, batch=<the finished Batch, as stored>.
batch_finished = Signal()


def send_batch_finished(batch_id: int) -> None:
    """Tell the listeners that the batch is finished. A listener that fails is logged: the batch stays done."""
    batch = Batch.objects.select_related("laboratory", "model").get(pk=batch_id)
    for receiver, result in batch_finished.send_robust(sender=Batch, batch=batch):
        if isinstance(result, Exception):
            logger.error("batch %s: the batch_finished receiver %r failed", batch_id, receiver, exc_info=result)
