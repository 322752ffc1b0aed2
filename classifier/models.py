"""The model registry and the classified images (predictions)."""

from __future__ import annotations

import uuid
from pathlib import Path

from django.conf import settings
from django.db import models

from accounts.models import Laboratory
from wbc_ml import turns
from wbc_ml.inference import ModelSpec
from wbc_ml.review_flag import needs_review

from . import model_files

NORMALIZATION_LABELS = {"scale01": "0–1 scaling", "zscore": "Mean–Std z-score"}


class ClassifierModelQuerySet(models.QuerySet):
    def usable(self) -> ClassifierModelQuerySet:
        return self.filter(is_active=True)


class ClassifierModel(models.Model):
    """A registered model file and what its card says about how to feed it."""

    shared_across_labs = True  # a row without a laboratory (a bundled model) is offered to every lab

    name = models.CharField(max_length=120)
    version = models.CharField(max_length=40, default="1")
    architecture = models.CharField(max_length=60)
    file_name = models.CharField(max_length=255, help_text="file in the models folder")
    sha256 = models.CharField(max_length=64)
    input_height = models.PositiveIntegerField()
    input_width = models.PositiveIntegerField()
    normalization = models.JSONField(verbose_name="normalisation")
    class_names = models.JSONField()
    temperature = models.FloatField(default=1.0)
    ood_file_name = models.CharField(max_length=255, blank=True)
    ood_sha256 = models.CharField(max_length=64, blank=True, help_text="checksum of the detector file")
    parameters = models.PositiveBigIntegerField(null=True, blank=True)
    test_accuracy = models.FloatField(null=True, blank=True)
    card = models.JSONField(default=dict, blank=True)
    onnx_file_name = models.CharField(max_length=255, blank=True, help_text="ONNX copy used for serving")
    onnx_sha256 = models.CharField(max_length=64, blank=True, help_text="checksum of the ONNX copy")
    onnx_status = models.CharField(max_length=500, blank=True, help_text="why serving falls back to TensorFlow")
    is_active = models.BooleanField(default=True)
    is_bundled = models.BooleanField(default=False)
    laboratory = models.ForeignKey(
        Laboratory, null=True, blank=True, on_delete=models.CASCADE, help_text="empty: available to every lab"
    )
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ClassifierModelQuerySet.as_manager()

    class Meta:
        ordering = ["name", "-created_at"]
        constraints = [models.UniqueConstraint(fields=["name", "version"], name="unique_model_name_version")]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def path(self) -> Path:
        """The model file on this host: a bundled one in the checkout, an upload from the models storage (fetched
        into this host's checked cache when the storage is remote; see :mod:`classifier.model_files`)."""
        if self.is_bundled:
            return Path(settings.WBC_MODELS_DIR) / self.file_name
        return model_files.local_path(model_files.MODELS, self.file_name, self.sha256, "model file")

    @property
    def normalization_label(self) -> str:
        return NORMALIZATION_LABELS.get(self.normalization.get("method"), "?")

    def choice_label(self) -> str:
        """What the model dropdowns show: enough to choose between models at a glance."""
        parts = [self.name, f"{self.input_height}×{self.input_width}"]
        if self.parameters:
            parts.append(f"{self.parameters / 1e6:.1f}M params")
        if self.test_accuracy is not None:
            parts.append(f"test acc {self.test_accuracy:.1%}")
        if self.laboratory_id:
            parts.append("lab model")
        return " · ".join(parts)

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.input_height, self.input_width)

    @property
    def review_rates(self) -> dict | None:
        """From the card: shares of held-out non-WBC cells and of WBC test images flagged for review at 0.85."""
        ood = self.card.get("ood") or {}
        if "non_wbc_flagged_share" not in ood or "wbc_flagged_share" not in ood:
            return None
        return {"non_wbc": ood["non_wbc_flagged_share"], "wbc": ood["wbc_flagged_share"]}

    def _ood_path(self) -> Path:
        """The detector file: beside a bundled model in the checkout, else in the models storage."""
        if self.is_bundled:
            return Path(settings.WBC_MODELS_DIR) / self.ood_file_name
        return model_files.local_path(model_files.MODELS, self.ood_file_name, self.ood_sha256, "detector file")

    def spec(self, normalization: dict | None = None) -> ModelSpec:
        """How to serve this model; ``normalization`` overrides the card's (the user's choice).

        The paths are on this host: stored files are fetched into its cache first when the storage is remote.
        """
        ood = self._ood_path() if self.ood_file_name else None
        onnx = (
            model_files.local_path(model_files.ONNX, self.onnx_file_name, self.onnx_sha256, "ONNX copy")
            if self.onnx_file_name
            else None
        )
        return ModelSpec(
            onnx_path=onnx,
            path=self.path,
            sha256=self.sha256,
            input_size=self.input_size,
            normalization=normalization or self.normalization,
            class_names=tuple(self.class_names),
            temperature=self.temperature,
            ood_path=ood,
            ood_sha256=self.ood_sha256 or None,
            onnx_sha256=self.onnx_sha256 or None,
            allow_keras_fallback=self.is_bundled,  # a lab's upload: ONNX only, never Keras in the web process
            quarter_turns=int(self.card.get(turns.CARD_KEY, 1)),
        )


def cell_upload_to(instance: Prediction, filename: str) -> str:
    suffix = Path(filename).suffix.lower() or ".png"
    return f"cells/{instance.laboratory_id}/{instance.uid}{suffix}"


def saliency_upload_to(instance: Prediction, filename: str) -> str:
    return f"saliency/{instance.laboratory_id}/{filename}"


class PredictionQuerySet(models.QuerySet):
    def with_model(self) -> PredictionQuerySet:
        """Each prediction with its model in the same query, less the model card: a ~10 kB JSON document that only
        the models page reads, and parsing it took longer than reading the rest of the rows."""
        return self.select_related("model").defer("model__card")


class Prediction(models.Model):
    """One classified cell image with everything needed to show it again."""

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    laboratory = models.ForeignKey(Laboratory, on_delete=models.CASCADE, related_name="predictions")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="predictions")
    model = models.ForeignKey(ClassifierModel, on_delete=models.PROTECT, related_name="predictions")
    model_version = models.CharField(max_length=40)
    model_sha256 = models.CharField(
        max_length=64, blank=True, help_text="checksum of the exact model file that classified the image"
    )
    normalization = models.JSONField(
        default=dict, blank=True, verbose_name="normalisation", help_text="the normalisation applied"
    )
    image = models.FileField(upload_to=cell_upload_to)
    original_filename = models.CharField(max_length=255)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    predicted_class = models.CharField(max_length=40)
    confidence = models.FloatField()
    probabilities = models.JSONField(help_text="calibrated, in the model's class order")
    ood_score = models.FloatField(null=True, blank=True)
    is_outlier = models.BooleanField(default=False, help_text="far from every training class")
    processing_ms = models.FloatField()
    gradcam = models.FileField(upload_to=saliency_upload_to, blank=True)
    gradient = models.FileField(upload_to=saliency_upload_to, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    objects = PredictionQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.original_filename}: {self.predicted_class} ({self.confidence:.2f})"

    def needs_review(self, threshold: float) -> bool:
        return needs_review(self.confidence, self.is_outlier, threshold)

    OUTLIER_REASON = "unlike the five white-cell classes"
    LOW_CONFIDENCE_REASON = "low confidence"

    def flag_reason(self, threshold: float) -> str:
        """Why this cell goes to review, in words ("" when it does not): the detector's verdict comes first."""
        return self.reason_for(self.confidence, self.is_outlier, threshold)

    @classmethod
    def reason_for(cls, confidence: float, is_outlier: bool, threshold: float) -> str:
        """The same sentence from plain values (lists that read rows, not model instances)."""
        if is_outlier:
            return cls.OUTLIER_REASON
        return cls.LOW_CONFIDENCE_REASON if confidence < threshold else ""

    @property
    def normalization_label(self) -> str:
        return NORMALIZATION_LABELS.get((self.normalization or self.model.normalization).get("method"), "?")

    @property
    def normalization_differs(self) -> bool:
        return bool(self.normalization) and self.normalization != self.model.normalization

    def probability_of(self) -> dict[str, float]:
        return dict(zip(self.model.class_names, self.probabilities, strict=True))

    def ranked_probabilities(self) -> list[tuple[str, float]]:
        return sorted(zip(self.model.class_names, self.probabilities, strict=True), key=lambda kv: -kv[1])
