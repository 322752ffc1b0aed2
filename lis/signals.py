"""The sign-off hook: a report version saved as final (signed, and countersigned when the lab wants two people)
writes its outbox rows in the same transaction, whichever code path saved it (sign, countersign, the admin).
The finished-batch hook: when the lab sends AI-only results, a batch the worker finished writes its preliminary
result's outbox rows."""

from __future__ import annotations

from django.db.models.signals import post_save
from django.dispatch import receiver

from reports.models import Batch, ReportVersion
from reports.signals import batch_finished

from .outbox import report_ai_only_finished, report_signed


@receiver(post_save, sender=ReportVersion, dispatch_uid="lis.report_signed")
def _report_version_saved(sender, instance: ReportVersion, raw: bool = False, **kwargs) -> None:
    if not raw and instance.signed_at is not None:
        report_signed(instance)


@receiver(batch_finished, sender=Batch, dispatch_uid="lis.batch_finished")
def _batch_finished(sender, batch: Batch, **kwargs) -> None:
    report_ai_only_finished(batch)
