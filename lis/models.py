"""What the laboratory information system (LIS) receives: per-lab message settings and code overrides, the
destinations (MLLP or FHIR REST), the patient identifier an LIS supplied with a slide, and the outbox: one row per
message and destination, written in the sign-off transaction and delivered by the background worker, with every
attempt recorded."""

from __future__ import annotations

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from accounts.models import Laboratory
from reports.models import Batch, ReportVersion


class LisSettings(models.Model):
    """How a laboratory's result messages look (one row per lab, made with its defaults on first use)."""

    laboratory = models.OneToOneField(Laboratory, on_delete=models.CASCADE, related_name="lis_settings")
    sending_application = models.CharField(max_length=180, default="WBC-CLASSIFIER", help_text="MSH-3")
    sending_facility = models.CharField(max_length=180, blank=True, help_text="MSH-4 (empty: the lab's name)")
    receiving_application = models.CharField(max_length=180, blank=True, help_text="MSH-5")
    receiving_facility = models.CharField(max_length=180, blank=True, help_text="MSH-6")
    local_coding_system = models.CharField(
        max_length=20, default="99WBC", help_text="name of the lab's own coding system, for codes LOINC has not"
    )
    identifier_system = models.CharField(
        max_length=200,
        default="urn:wbc-platform:report",
        help_text="FHIR identifier system of our reports (the conditional create/update key)",
    )
    patient_id_system = models.CharField(
        max_length=200, default="urn:wbc-platform:lis-patient", help_text="FHIR identifier system of LIS patient ids"
    )
    send_ai_only = models.BooleanField(
        default=False, help_text="also send unverified (AI-only) results, coded as an automated differential"
    )
    code_overrides = models.JSONField(
        default=dict, blank=True, help_text='{"category": {"code": "...", "text": "...", "system": "LN" or local}}'
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "LIS settings"
        verbose_name_plural = "LIS settings"

    def __str__(self) -> str:
        return f"LIS settings of {self.laboratory}"

    @classmethod
    def for_lab(cls, laboratory_id: int) -> LisSettings:
        row, _ = cls.objects.get_or_create(laboratory_id=laboratory_id)
        return row

    @property
    def facility(self) -> str:
        return self.sending_facility or self.laboratory.name


class Destination(models.Model):
    """Where a lab's messages go: an HL7 v2 MLLP listener (optionally TLS), or a FHIR REST base URL."""

    class Kind(models.TextChoices):
        MLLP = "mllp", "HL7 v2.5.1 over MLLP"
        FHIR = "fhir", "FHIR R4 REST"

    laboratory = models.ForeignKey(Laboratory, on_delete=models.CASCADE, related_name="lis_destinations")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    is_active = models.BooleanField(default=True)
    host = models.CharField(max_length=255, blank=True, help_text="MLLP: host name or address")
    port = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(65535)], help_text="MLLP: port"
    )
    use_tls = models.BooleanField(default=False, help_text="MLLP over TLS (the server certificate is verified)")
    base_url = models.URLField(max_length=500, blank=True, help_text="FHIR: the server's base URL")
    token_encrypted = models.TextField(blank=True, editable=False, help_text="FHIR bearer token, encrypted")
    token_env = models.CharField(
        max_length=100, blank=True, help_text="FHIR: name of an environment variable holding the bearer token"
    )
    timeout_s = models.FloatField(default=10.0, validators=[MinValueValidator(0.1), MaxValueValidator(300.0)])
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["laboratory", "name", "id"]
        constraints = [models.UniqueConstraint(fields=["laboratory", "name"], name="unique_lis_destination_name")]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_kind_display()})"

    @property
    def address(self) -> str:
        if self.kind == self.Kind.MLLP:
            return f"{'mllps' if self.use_tls else 'mllp'}://{self.host}:{self.port}"
        return self.base_url

    @property
    def has_token(self) -> bool:
        return bool(self.token_encrypted or self.token_env)


class SlidePatient(models.Model):
    """The patient identifier an LIS supplied with a slide (PID-3 / Patient.identifier); without it, messages
    carry the accession only."""

    batch = models.OneToOneField(Batch, on_delete=models.CASCADE, related_name="lis_patient")
    patient_id = models.CharField(max_length=100)
    assigning_authority = models.CharField(max_length=100, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.batch}: {self.patient_id}"


class OutboxMessage(models.Model):
    """One message for one destination. Written in the sign-off transaction; the worker claims it with a lease
    (a killed worker's message is sent again once the lease runs out), so a receiver may see a control id twice
    but never misses one. A destination's messages go out in id order."""

    class Status(models.TextChoices):
        PENDING = "pending"  # waiting for its turn, being sent, or waiting to be retried (next_attempt_at)
        DELIVERED = "delivered"  # AA, or the FHIR server accepted the transaction
        FAILED = "failed"  # the receiver refused it (AE/AR, HTTP 4xx): needs a person; resend from the page

    class Format(models.TextChoices):
        HL7 = "hl7", "HL7 v2.5.1 ORU^R01"
        FHIR = "fhir", "FHIR R4 Bundle"

    laboratory = models.ForeignKey(Laboratory, on_delete=models.CASCADE, related_name="lis_messages")
    destination = models.ForeignKey(Destination, on_delete=models.PROTECT, related_name="messages")
    batch = models.ForeignKey(Batch, on_delete=models.PROTECT, related_name="lis_messages")
    report_version = models.ForeignKey(
        ReportVersion,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="lis_messages",
        help_text="empty: the AI-only (preliminary, unsigned) result of the finished batch",
    )
    format = models.CharField(max_length=10, choices=Format.choices)
    control_id = models.CharField(
        max_length=60, help_text="MSH-10 / Bundle identifier: stable per report version (or per batch, AI-only)"
    )
    is_correction = models.BooleanField(default=False)
    payload = models.TextField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    lease = models.UUIDField(null=True, blank=True, help_text="the worker run sending it")
    lease_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["destination", "control_id"], name="unique_lis_message_per_destination")
        ]
        indexes = [models.Index(fields=["destination", "status", "id"], name="lis_outbox_queue")]

    def __str__(self) -> str:
        return f"{self.control_id} -> {self.destination} ({self.status})"


class DeliveryAttempt(models.Model):
    """Every try at sending a message, whatever came of it."""

    class Outcome(models.TextChoices):
        ACCEPTED = "accepted"
        REJECTED = "rejected"  # AE / AR / HTTP 4xx
        RETRY = "retry"  # timeout, refused or dropped connection, HTTP 5xx

    message = models.ForeignKey(OutboxMessage, on_delete=models.CASCADE, related_name="attempts_log")
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True, help_text="empty: the worker stopped mid-send")
    outcome = models.CharField(max_length=10, choices=Outcome.choices, blank=True)
    ack_code = models.CharField(max_length=10, blank=True, help_text="MSA-1, or the HTTP status")
    detail = models.TextField(blank=True)
    worker = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["message", "started_at", "id"]

    def __str__(self) -> str:
        return f"{self.message.control_id}: {self.outcome} {self.ack_code}"


__all__ = ["DeliveryAttempt", "Destination", "LisSettings", "OutboxMessage", "SlidePatient"]
