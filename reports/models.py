"""Slides (batches) with their items, and evaluation runs: a finished batch scored against true labels."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from accounts.models import Laboratory, threshold_validators
from classifier.models import ClassifierModel, Prediction
from wbc_ml.review_flag import DEFAULT_THRESHOLD


class Batch(models.Model):
    """A sample (slide): many cell images classified together into one differential."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    laboratory = models.ForeignKey(Laboratory, on_delete=models.CASCADE, related_name="batches")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="batches")
    name = models.CharField(max_length=200)
    external_id = models.CharField(max_length=100, blank=True, db_index=True, help_text="LIS sample/accession id")
    model = models.ForeignKey(ClassifierModel, on_delete=models.PROTECT, related_name="batches")
    normalization = models.JSONField(
        default=dict, blank=True, verbose_name="normalisation", help_text="empty: the model's own"
    )
    threshold = models.FloatField(default=DEFAULT_THRESHOLD, validators=threshold_validators())
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(
        default=0, help_text="the most times a worker has taken one of its chunks (1 when nothing went wrong)"
    )
    idempotency_key = models.CharField(max_length=200, blank=True)
    wbc_count = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(1000.0)],
        help_text="total WBC count of the sample, ×10⁹/L (optional: gives absolute counts)",
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "batches"
        constraints = [
            models.UniqueConstraint(
                fields=["laboratory", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="unique_batch_idempotency_key_per_lab",
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.DONE, self.Status.FAILED)


class BatchChunk(models.Model):
    """A run of a batch's items (positions ``first_position`` up to, not including, ``end_position``) that one
    worker task classifies. A large batch has several, so several workers (on several hosts) share it.

    A worker takes a chunk with a conditional UPDATE (queued, or running with an expired lease) and renews
    ``heartbeat_at`` while it works; ``attempts`` counts the takes, ``worker_id`` names the last taker (its
    heartbeat row). Whoever finishes the last chunk finishes the batch (see :mod:`reports.worker`).
    """

    lab_path = "batch__laboratory"  # accounts.scoping

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    first_position = models.PositiveIntegerField()
    end_position = models.PositiveIntegerField(help_text="one past the position of its last item")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    lease = models.UUIDField(null=True, blank=True, help_text="the worker run that holds the chunk")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    queued_at = models.DateTimeField(default=timezone.now, help_text="when it was (last) put in the queue")
    attempts = models.PositiveIntegerField(default=0, help_text="times a worker has taken the chunk")
    worker_id = models.CharField(max_length=64, blank=True, help_text="the worker that took it last")
    error = models.TextField(blank=True)
    bundle = models.FileField(
        upload_to="bundles/%Y/%m/",
        blank=True,
        help_text="the chunk's uploaded images in one zip, until its worker has stored each as the item's own file",
    )

    class Meta:
        ordering = ["batch", "index"]
        constraints = [models.UniqueConstraint(fields=["batch", "index"], name="unique_chunk_per_batch")]

    def __str__(self) -> str:
        return f"{self.batch} chunk {self.index} ({self.status})"


class BatchItem(models.Model):
    """One file of a batch: stored and waiting, classified (with its prediction), or refused with a reason."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        FAILED = "failed"

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="items")
    position = models.PositiveIntegerField()
    original_filename = models.CharField(max_length=255)
    image = models.FileField(upload_to="batches/%Y/%m/", blank=True)
    source_url = models.CharField(
        max_length=2000, blank=True, help_text="an image URL (without credentials) the worker fetches"
    )
    thumbnail = models.FileField(
        upload_to="thumbnails/%Y/%m/",
        blank=True,
        help_text="small JPEG for the review gallery (WebP before), made by the worker",
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    error = models.CharField(max_length=500, blank=True)
    prediction = models.OneToOneField(
        Prediction, null=True, blank=True, on_delete=models.SET_NULL, related_name="batch_item"
    )

    class Meta:
        ordering = ["position", "id"]

    def __str__(self) -> str:
        return f"{self.original_filename} ({self.status})"


def worker_file_name(field_name: str, stem: str, suffix: str) -> str:
    """Where a worker writes one of an item's files (``image`` or ``thumbnail``): a key of its own on every write.

    Media is written without looking for a free name first (S3, ``file_overwrite``), and a worker that has lost its
    chunk deletes what it wrote; two workers writing the same item must never share a key.
    """
    field = BatchItem._meta.get_field(field_name)
    return field.generate_filename(None, f"{stem}-{uuid.uuid4().hex[:12]}{suffix}")


class CellVerification(models.Model):
    """A technologist's class for one cell. It sits beside the AI's class (the prediction) and never replaces it;
    every change is kept in the audit trail."""

    lab_path = "item__batch__laboratory"  # accounts.scoping

    item = models.OneToOneField(BatchItem, on_delete=models.PROTECT, related_name="verification")
    verified_class = models.CharField(max_length=40, help_text="a WBC class or one of the lab's cell categories")
    verified_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    verified_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.item}: {self.verified_class}"


class ReportVersion(models.Model):
    """One version of a slide's report: signed (and countersigned when the lab asks for two people), then locked.

    Version 1 is the first sign-off; every amendment opens the next version, with its reason, and is signed again.
    ``snapshot`` keeps the report exactly as it was signed, so old versions stay readable.
    """

    lab_path = "batch__laboratory"  # accounts.scoping

    batch = models.ForeignKey(Batch, on_delete=models.PROTECT, related_name="report_versions")
    number = models.PositiveIntegerField()
    amendment_reason = models.TextField(blank=True)
    opened_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    opened_at = models.DateTimeField()
    signed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    signed_at = models.DateTimeField(null=True, blank=True)
    countersigned_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    countersigned_at = models.DateTimeField(null=True, blank=True)
    snapshot = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["batch", "number"]
        constraints = [models.UniqueConstraint(fields=["batch", "number"], name="unique_report_version")]

    def __str__(self) -> str:
        return f"{self.batch} v{self.number}"


class WorkerHeartbeat(models.Model):
    """A background worker process says it is alive: written at start and every few seconds while it runs."""

    worker_id = models.CharField(max_length=64, unique=True)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True, help_text="set when the worker stopped cleanly")

    class Meta:
        ordering = ["-last_seen"]

    def __str__(self) -> str:
        return f"worker {self.host}:{self.pid} (last seen {self.last_seen:%Y-%m-%d %H:%M:%S})"


class EvaluationRun(models.Model):
    """The metrics of one batch against one label file, with the figures and every problem found in the file.

    ``metrics`` holds three ``classification_report`` results: ``all`` labelled images, the ``confident``
    ones (at/above the threshold and not an outlier) and the ``flagged`` ones (below it, or an outlier);
    a subset without images is ``{"n": 0}``. ``problems`` lists unknown classes, duplicate rows, invalid
    rows, rows whose file is not in the batch, labelled images the batch could not classify and
    classified images without a label.
    """

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    laboratory = models.ForeignKey(Laboratory, on_delete=models.CASCADE, related_name="evaluation_runs")
    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="evaluation_runs")
    model = models.ForeignKey(ClassifierModel, on_delete=models.PROTECT, related_name="evaluation_runs")
    model_version = models.CharField(max_length=40)
    threshold = models.FloatField(validators=threshold_validators())
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="evaluation_runs")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    labels_sha256 = models.CharField(max_length=64)
    labels_filename = models.CharField(max_length=255)
    n_labelled = models.PositiveIntegerField(help_text="classified images with a usable label")
    metrics = models.JSONField(default=dict)
    problems = models.JSONField(default=dict)
    labels = models.JSONField(
        default=dict, blank=True, help_text="the true class of every labelled image: batch item id -> class"
    )
    confusion_png = models.FileField(upload_to="evaluations/", blank=True)
    roc_png = models.FileField(upload_to="evaluations/", blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.batch} × {self.labels_filename} ({self.model})"

    @property
    def overall(self) -> dict:
        return self.metrics.get("all") or {"n": 0}

    @property
    def class_names(self) -> list[str]:
        return list(self.metrics.get("class_names") or self.model.class_names)

    @property
    def problem_count(self) -> int:
        return sum(len(v) for v in self.problems.values() if isinstance(v, list))
