"""An adaptation job: a lab's Model admin adapts a model to the lab's labelled cells, then promotes or discards it."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from accounts.models import Laboratory
from classifier.models import ClassifierModel


class AdaptationJob(models.Model):
    """One run of :mod:`wbc_ml.adaptation` for one laboratory, with everything needed to judge its result.

    ``cells`` lists every labelled cell the job uses, each with its role: ``train`` (adaptation and
    cross-validation) or ``held_back`` (kept out of both; base and adapted model are compared on them). The
    status moves by :meth:`save` (an audit row each: who started, cancelled, promoted, discarded); the progress
    moves by queryset updates, which the audit trail does not need to repeat every few seconds.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        READY = "ready", "ready for review"  # registered, not the lab's default
        PROMOTED = "promoted", "promoted to the lab's default"
        DISCARDED = "discarded"
        CANCELLED = "cancelled"
        FAILED = "failed"

    ACTIVE = (Status.QUEUED, Status.RUNNING)
    FINISHED = (Status.READY, Status.PROMOTED, Status.DISCARDED, Status.CANCELLED, Status.FAILED)

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    laboratory = models.ForeignKey(Laboratory, on_delete=models.CASCADE, related_name="adaptation_jobs")
    started_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    base_model = models.ForeignKey(ClassifierModel, on_delete=models.PROTECT, related_name="adaptation_jobs")
    base_sha256 = models.CharField(max_length=64, help_text="checksum of the base model file when the job started")
    sources = models.JSONField(default=list, help_text="where the labelled cells come from")
    cells = models.JSONField(default=list, help_text="every labelled cell used, with its role (train / held back)")
    config = models.JSONField(default=dict, blank=True, help_text="the adaptation settings (methods, grid, seed)")
    seed = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED, db_index=True)
    stage = models.CharField(max_length=200, blank=True)
    progress = models.FloatField(default=0.0, help_text="share of the planned work done (0 to 1)")
    cancel_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    evaluation = models.JSONField(default=dict, blank=True, help_text="base vs adapted on the held-back cells")
    result_model = models.ForeignKey(
        ClassifierModel, null=True, blank=True, on_delete=models.PROTECT, related_name="adapted_by_jobs"
    )
    previous_default = models.ForeignKey(
        ClassifierModel,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="the lab's default model before promotion (restored if the adapted model is discarded)",
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(null=True, blank=True, help_text="the last progress the worker stored")
    finished_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"adaptation of {self.base_model} for {self.laboratory} ({self.get_status_display()})"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    def cells_with_role(self, role: str) -> list[dict]:
        return [cell for cell in self.cells if cell["role"] == role]

    def counts(self, role: str) -> dict[str, int]:
        """Cells per class of one role, in the base model's class order."""
        counts = dict.fromkeys(self.base_model.class_names, 0)
        for cell in self.cells_with_role(role):
            counts[cell["class"]] += 1
        return counts

    def elapsed_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        return ((self.finished_at or timezone.now()) - self.started_at).total_seconds()

    def remaining_seconds(self) -> float | None:
        """From the share done so far: elapsed × (1 - done) / done (None until the first steps are done)."""
        elapsed = self.elapsed_seconds()
        if self.status != self.Status.RUNNING or elapsed is None or self.progress < 0.02:
            return None
        return elapsed * (1 - self.progress) / self.progress
