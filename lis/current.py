"""The slide's current messages: those of its latest final report version (what the LIS should hold now)."""

from __future__ import annotations

from accounts.models import LabSettings
from reports.models import Batch, ReportVersion

from .content import is_final
from .models import LisSettings
from .outbox import ai_only_messages, messages_for_version


def current_version(batch: Batch) -> ReportVersion | None:
    """The latest final version (an open or unsigned amendment does not replace what was sent)."""
    lab_settings = LabSettings.for_lab(batch.laboratory_id)
    versions = batch.report_versions.select_related("signed_by", "countersigned_by").order_by("-number")
    return next((v for v in versions if is_final(v, lab_settings)), None)


def current_messages(batch: Batch) -> dict[str, str] | None:
    """{"hl7": ER7, "fhir": JSON, "control_id": …}, or None when there is nothing to send yet."""
    version = current_version(batch)
    if version is not None:
        messages = messages_for_version(version)
    elif batch.status == Batch.Status.DONE and LisSettings.for_lab(batch.laboratory_id).send_ai_only:
        messages = ai_only_messages(batch)
    else:
        return None
    return messages
