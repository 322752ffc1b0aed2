from __future__ import annotations

import uuid
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from wbc_ml.inference import ModelSpec

THRESHOLD_MIN, THRESHOLD_MAX = 0.50, 0.99
NORMALIZATION_LABELS = {"scale01": "0–1 scaling", "zscore": "Mean–Std z-score"}


def threshold_validators() -> list:
    return [MinValueValidator(THRESHOLD_MIN), MaxValueValidator(THRESHOLD_MAX)]


class Laboratory(models.Model):
    name = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "laboratories"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class User(AbstractUser):
    """A platform user; every user works in exactly one laboratory."""

    laboratory = models.ForeignKey(Laboratory, on_delete=models.PROTECT, related_name="members", null=True)
    review_threshold = models.FloatField(default=settings.WBC_DEFAULT_THRESHOLD, validators=threshold_validators())
    default_model = models.ForeignKey(
        "ClassifierModel",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="preselected on the classify and batch pages (the last model used)",
    )


class ClassifierModelQuerySet(models.QuerySet):
    def usable(self) -> ClassifierModelQuerySet:
        return self.filter(is_active=True)


class ClassifierModel(models.Model):
    """A registered model file and what its card says about how to feed it."""

    name = models.CharField(max_length=120)
    version = models.CharField(max_length=40, default="1")
    architecture = models.CharField(max_length=60)
    file_name = models.CharField(max_length=255, help_text="file in the models folder")
    sha256 = models.CharField(max_length=64)
    input_height = models.PositiveIntegerField()
    input_width = models.PositiveIntegerField()
    normalization = models.JSONField()
    class_names = models.JSONField()
    temperature = models.FloatField(default=1.0)
    ood_file_name = models.CharField(max_length=255, blank=True)
    parameters = models.PositiveBigIntegerField(null=True, blank=True)
    test_accuracy = models.FloatField(null=True, blank=True)
    card = models.JSONField(default=dict, blank=True)
    onnx_file_name = models.CharField(max_length=255, blank=True, help_text="ONNX copy used for serving")
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
        folder = settings.WBC_MODELS_DIR if self.is_bundled else settings.WBC_CUSTOM_MODELS_DIR
        return Path(folder) / self.file_name

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

    def spec(self, normalization: dict | None = None) -> ModelSpec:
        """How to serve this model; ``normalization`` overrides the card's (the user's choice)."""
        ood = Path(settings.WBC_MODELS_DIR) / self.ood_file_name if self.ood_file_name else None
        onnx = Path(settings.WBC_ONNX_DIR) / self.onnx_file_name if self.onnx_file_name else None
        return ModelSpec(
            onnx_path=onnx,
            path=self.path,
            sha256=self.sha256,
            input_size=self.input_size,
            normalization=normalization or self.normalization,
            class_names=tuple(self.class_names),
            temperature=self.temperature,
            ood_path=ood,
        )


def cell_upload_to(instance: Prediction, filename: str) -> str:
    suffix = Path(filename).suffix.lower() or ".png"
    return f"cells/{instance.laboratory_id}/{instance.uid}{suffix}"


def saliency_upload_to(instance: Prediction, filename: str) -> str:
    return f"saliency/{instance.laboratory_id}/{filename}"


class Prediction(models.Model):
    """One classified cell image with everything needed to show it again."""

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    laboratory = models.ForeignKey(Laboratory, on_delete=models.CASCADE, related_name="predictions")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="predictions")
    model = models.ForeignKey(ClassifierModel, on_delete=models.PROTECT, related_name="predictions")
    model_version = models.CharField(max_length=40)
    normalization = models.JSONField(default=dict, blank=True, help_text="the normalisation applied")
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

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.original_filename}: {self.predicted_class} ({self.confidence:.2f})"

    def needs_review(self, threshold: float) -> bool:
        return self.confidence < threshold or self.is_outlier

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
    normalization = models.JSONField(default=dict, blank=True, help_text="empty: the model's own")
    threshold = models.FloatField(default=settings.WBC_DEFAULT_THRESHOLD, validators=threshold_validators())
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    error = models.TextField(blank=True)
    lease = models.UUIDField(null=True, blank=True, help_text="the worker run that holds the batch")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=200, blank=True)
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
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    error = models.CharField(max_length=500, blank=True)
    prediction = models.OneToOneField(
        Prediction, null=True, blank=True, on_delete=models.SET_NULL, related_name="batch_item"
    )

    class Meta:
        ordering = ["position", "id"]

    def __str__(self) -> str:
        return f"{self.original_filename} ({self.status})"


class ApiToken(models.Model):
    """A personal API key for the LIS. The key is shown once, at creation, and never stored.

    A key reads ``wbc_<prefix>_<secret>``. The database keeps the short, non-secret ``prefix`` (to find the row)
    and an HMAC-SHA256 of the whole key under ``SECRET_KEY`` (``digest``), compared in constant time. A revoked
    token stays listed (with when it was revoked) but no longer authenticates.
    """

    KEY_PREFIX = "wbc"
    PREFIX_BYTES = 6  # 12 hex characters: enough to find the row, nothing an attacker can use
    SECRET_BYTES = 32
    HMAC_SALT = "classifier.ApiToken.digest"
    LAST_USED_RESOLUTION_S = 60  # last_used_at is written at most once a minute per token

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="what the token is for, e.g. “LIS production”")
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    digest = models.CharField(max_length=64, editable=False, help_text="HMAC-SHA256 of the key; never the key")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.KEY_PREFIX}_{self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    @property
    def shown_prefix(self) -> str:
        return f"{self.KEY_PREFIX}_{self.prefix}_…"

    @classmethod
    def compute_digest(cls, key: str, secret_key: str | None = None) -> str:
        from django.utils.crypto import salted_hmac

        return salted_hmac(cls.HMAC_SALT, key, secret=secret_key or settings.SECRET_KEY, algorithm="sha256").hexdigest()

    def assign_new_key(self) -> str:
        """Give this (unsaved) token a fresh key; returns the key, which is not kept anywhere."""
        import secrets

        self.prefix = secrets.token_hex(self.PREFIX_BYTES)
        key = f"{self.KEY_PREFIX}_{self.prefix}_{secrets.token_urlsafe(self.SECRET_BYTES)}"
        self.digest = self.compute_digest(key)
        return key

    @classmethod
    def issue(cls, user, name: str) -> tuple[ApiToken, str]:
        """Create and store a token for ``user``; returns it with its key (show the key once, then forget it)."""
        from django.db import IntegrityError, transaction

        for _attempt in range(3):  # a prefix collision (48 random bits) is practically impossible; retry anyway
            token = cls(user=user, name=name.strip()[:100] or "API token")
            key = token.assign_new_key()
            try:
                with transaction.atomic():
                    token.save()
            except IntegrityError:
                continue
            return token, key
        raise RuntimeError("could not allocate a unique token prefix")

    @classmethod
    def find(cls, key: str) -> ApiToken | None:
        """The active token whose key this is, or None. Constant-time digest comparison."""
        from django.utils.crypto import constant_time_compare

        parts = key.split("_", 2)
        valid_shape = len(parts) == 3 and parts[0] == cls.KEY_PREFIX and len(parts[1]) == 2 * cls.PREFIX_BYTES
        token = (
            cls.objects.select_related("user", "user__laboratory").filter(prefix=parts[1]).first()
            if valid_shape
            else None
        )
        secret_keys = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
        matched = None
        for index, secret_key in enumerate(secret_keys):
            # Always compute at least one HMAC, so an unknown prefix takes as long as a wrong secret.
            if constant_time_compare(cls.compute_digest(key, secret_key), token.digest if token else "-"):
                matched = index
                break
            if token is None:
                break
        if token is None or matched is None or not token.is_active:
            return None
        if matched:  # made under a rotated SECRET_KEY: re-key the digest with the current one
            token.digest = cls.compute_digest(key)
            cls.objects.filter(pk=token.pk).update(digest=token.digest)
        return token

    def touch(self) -> None:
        """Record use (at most once a minute, so a busy LIS does not turn every request into a write)."""
        from datetime import timedelta

        from django.utils import timezone

        now = timezone.now()
        if self.last_used_at is None or now - self.last_used_at > timedelta(seconds=self.LAST_USED_RESOLUTION_S):
            type(self).objects.filter(pk=self.pk).update(last_used_at=now)
            self.last_used_at = now

    def revoke(self) -> None:
        from django.utils import timezone

        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            type(self).objects.filter(pk=self.pk, revoked_at__isnull=True).update(revoked_at=self.revoked_at)
