"""The outbox: result messages written in the same transaction as the sign-off, for every active destination of
the laboratory. The background worker (lis.delivery) sends them; nothing here talks to the network."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from accounts.models import LabSettings
from reports.models import Batch, ReportVersion

from .content import LabReport, is_final, report_ai_only, report_for_version
from .fhir import build_bundle_json
from .hl7 import build_oru
from .models import Destination, LisSettings, OutboxMessage

FORMAT_OF = {Destination.Kind.MLLP: OutboxMessage.Format.HL7, Destination.Kind.FHIR: OutboxMessage.Format.FHIR}


def payload_for(report: LabReport, message_format: str) -> str:
    return build_oru(report) if message_format == OutboxMessage.Format.HL7 else build_bundle_json(report)


def _enqueue(batch: Batch, version: ReportVersion | None, report: LabReport) -> list[OutboxMessage]:
    now = timezone.now()
    payloads: dict[str, str] = {}
    written = []
    with transaction.atomic():
        # Locking the destinations orders concurrent sign-offs: a destination's ids are committed in order.
        destinations = Destination.objects.select_for_update().filter(laboratory_id=batch.laboratory_id, is_active=True)
        for destination in destinations.order_by("id"):
            message_format = FORMAT_OF[destination.kind]
            if message_format not in payloads:
                payloads[message_format] = payload_for(report, message_format)
            message, created = OutboxMessage.objects.get_or_create(
                destination=destination,
                control_id=report.control_id,
                defaults={
                    "laboratory_id": batch.laboratory_id,
                    "batch": batch,
                    "report_version": version,
                    "format": message_format,
                    "is_correction": report.is_correction,
                    "payload": payloads[message_format],
                    "next_attempt_at": now,
                },
            )
            if created:
                written.append(message)
    return written


def report_signed(version: ReportVersion) -> None:
    """Call inside the sign-off (and countersign) transaction: once the version is final (signed, and countersigned
    when the lab wants two people), write one outbox row per active destination of the lab. A later version (an
    amendment) goes out as a correction. Calling it again for the same version writes nothing new."""
    lab_id = version.batch.laboratory_id
    if not Destination.objects.filter(laboratory_id=lab_id, is_active=True).exists():
        return  # nowhere to send (the pull API still builds the messages on request)
    if not is_final(version, LabSettings.for_lab(lab_id)):
        return
    _enqueue(version.batch, version, report_for_version(version))


def report_ai_only_finished(batch: Batch) -> None:
    """Call once the worker has finished the batch: when the lab sends AI-only results, write the preliminary
    (unsigned, status P, automated-differential codes) result for every active destination of the lab. Nothing
    when the lab does not send them, when the batch is not done, or when a version is already signed (the final
    result must not be followed by a preliminary one). Calling it again writes nothing new (stable control id)."""
    lab_id = batch.laboratory_id
    if batch.status != Batch.Status.DONE or not LisSettings.for_lab(lab_id).send_ai_only:
        return
    if not Destination.objects.filter(laboratory_id=lab_id, is_active=True).exists():
        return
    if batch.report_versions.filter(signed_at__isnull=False).exists():
        return
    _enqueue(batch, None, report_ai_only(batch))


def messages_for_version(version: ReportVersion) -> dict[str, str]:
    """The messages of a final version in both formats (the pull API): exactly what the outbox sends."""
    return _all_formats(report_for_version(version))


def ai_only_messages(batch: Batch) -> dict[str, str]:
    return _all_formats(report_ai_only(batch))


def _all_formats(report: LabReport) -> dict[str, str]:
    return {"control_id": report.control_id} | {fmt: payload_for(report, fmt) for fmt in OutboxMessage.Format.values}
