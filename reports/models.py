"""Evaluation runs: a finished batch scored against the true labels a technologist uploaded."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from classifier.models import Batch, ClassifierModel, Laboratory, threshold_validators


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
