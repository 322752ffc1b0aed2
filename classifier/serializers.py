"""Serializers of the LIS API: what requests may carry and what responses look like.

Request serializers validate input only (the views call the same services as the web pages); response
serializers are read-only and need ``request`` (absolute URLs) and, where review flags are shown, ``threshold``
in their context.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from .models import THRESHOLD_MAX, THRESHOLD_MIN, ApiToken, Batch, BatchItem, ClassifierModel, Prediction
from .preprocessing import Normalization
from .scoping import scoped

THRESHOLD_HELP = f"Review threshold, {THRESHOLD_MIN:.2f}–{THRESHOLD_MAX:.2f}: below it (or an outlier) needs review."


def absolute(request, name: str, **kwargs) -> str:
    path = reverse(f"api:{name}", kwargs=kwargs)
    return request.build_absolute_uri(path) if request is not None else path


def threshold_field(**kwargs) -> serializers.FloatField:
    kwargs.setdefault("help_text", THRESHOLD_HELP)
    return serializers.FloatField(min_value=THRESHOLD_MIN, max_value=THRESHOLD_MAX, **kwargs)


# --- shared pieces ---------------------------------------------------------------------------------------------


class NormalizationSerializer(serializers.Serializer):
    method = serializers.ChoiceField(choices=["scale01", "zscore"])
    mean = serializers.ListField(child=serializers.FloatField(), min_length=3, max_length=3, required=False)
    std = serializers.ListField(child=serializers.FloatField(), min_length=3, max_length=3, required=False)


@extend_schema_field(NormalizationSerializer)
class NormalizationField(serializers.Field):
    """A normalisation override: an object, or (in multipart forms) the same object as JSON text."""

    default_error_messages = {"invalid": "{reason}"}

    def to_internal_value(self, data):
        if isinstance(data, str):
            if not data.strip():
                return None
            try:
                data = json.loads(data)
            except ValueError:
                self.fail("invalid", reason='Give JSON such as {"method": "scale01"}.')
        if not isinstance(data, dict):
            self.fail("invalid", reason='Give an object such as {"method": "scale01"}.')
        try:
            return Normalization.from_dict(data).to_dict()
        except (ValueError, TypeError) as exc:
            self.fail("invalid", reason=str(exc))

    def to_representation(self, value):
        return value or None  # an empty override ({}) means "the model's own": null


@extend_schema_field(OpenApiTypes.INT)
class ScopedModelField(serializers.PrimaryKeyRelatedField):
    """A model id among the caller's laboratory's usable models (another lab's id does not exist)."""

    def get_queryset(self):
        request = self.context.get("request")
        user = getattr(request, "user", None)
        return scoped(ClassifierModel.objects.usable(), user) if user is not None else ClassifierModel.objects.none()


class ModelRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    version = serializers.CharField()


def model_ref(record: ClassifierModel) -> dict:
    return {"id": record.pk, "name": record.name, "version": record.version}


# --- models ----------------------------------------------------------------------------------------------------


class ClassifierModelSerializer(serializers.ModelSerializer):
    input_size = serializers.SerializerMethodField(help_text="[height, width] in pixels")
    normalization = NormalizationField(read_only=True, help_text="the card's normalisation")
    normalization_label = serializers.CharField(read_only=True)
    label = serializers.CharField(source="choice_label", read_only=True, help_text="what the web dropdown shows")
    is_lab_model = serializers.SerializerMethodField(help_text="uploaded by your laboratory (not a bundled model)")

    class Meta:
        model = ClassifierModel
        fields = [
            "id",
            "name",
            "version",
            "architecture",
            "input_size",
            "normalization",
            "normalization_label",
            "class_names",
            "test_accuracy",
            "parameters",
            "is_active",
            "is_bundled",
            "is_lab_model",
            "label",
            "created_at",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.ListField(child=serializers.IntegerField(), min_length=2, max_length=2))
    def get_input_size(self, obj: ClassifierModel) -> list[int]:
        return [obj.input_height, obj.input_width]

    def get_is_lab_model(self, obj: ClassifierModel) -> bool:
        return obj.laboratory_id is not None


# --- predictions -----------------------------------------------------------------------------------------------


class ClassifyUploadSerializer(serializers.Serializer):
    """Classify one image: a JPEG/PNG ``file`` (multipart), or a ``url`` fetched by the server."""

    file = serializers.FileField(
        required=False, allow_empty_file=True, help_text="the image (JPEG or PNG, decided by content)"
    )
    url = serializers.CharField(
        required=False,
        max_length=2000,
        help_text="an http(s) image URL, fetched through the safe fetcher (instead of file)",
    )
    model = ScopedModelField(required=False, help_text="a model id from /models/ (default: your default model)")
    threshold = threshold_field(required=False)
    normalization = NormalizationField(required=False, allow_null=True, help_text="override the model's own")

    def validate(self, attrs):
        has_file, has_url = attrs.get("file") is not None, bool(attrs.get("url"))
        if has_file == has_url:
            raise serializers.ValidationError(
                {"file": ["Send exactly one of file (a multipart upload) or url."]}, code="required"
            )
        return attrs


class ClassifyUrlSerializer(serializers.Serializer):
    """The JSON form of classify (for the schema): ``url`` is required."""

    url = serializers.CharField(
        max_length=2000,
        help_text="an http(s) image URL, fetched through the safe fetcher",
    )
    model = ScopedModelField(required=False, help_text="a model id from /models/ (default: your default model)")
    threshold = threshold_field(required=False)
    normalization = NormalizationField(required=False, allow_null=True, help_text="override the model's own")


class ClassifyMultipartSerializer(ClassifyUploadSerializer):
    """The multipart form of classify (for the schema): ``file`` is required."""

    file = serializers.FileField(allow_empty_file=True, help_text="the image (JPEG or PNG, decided by content)")
    url = None


class SaliencyUrlsSerializer(serializers.Serializer):
    gradcam = serializers.URLField()
    gradient = serializers.URLField()


class PredictionSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="uid", read_only=True)
    url = serializers.SerializerMethodField()
    filename = serializers.CharField(source="original_filename", read_only=True)
    probabilities = serializers.SerializerMethodField(help_text="calibrated probability of each class")
    threshold = serializers.SerializerMethodField(help_text="the threshold needs_review was decided at")
    needs_review = serializers.SerializerMethodField()
    model = serializers.SerializerMethodField()
    normalization = serializers.SerializerMethodField(help_text="the normalisation applied")
    saliency = serializers.SerializerMethodField(help_text="PNG overlays (made on first request)")
    batch = serializers.SerializerMethodField(help_text="the batch this image belongs to, if any")

    class Meta:
        model = Prediction
        fields = [
            "id",
            "url",
            "filename",
            "predicted_class",
            "confidence",
            "probabilities",
            "threshold",
            "needs_review",
            "is_outlier",
            "ood_score",
            "model",
            "model_version",
            "normalization",
            "width",
            "height",
            "processing_ms",
            "created_at",
            "saliency",
            "batch",
        ]
        read_only_fields = fields

    def _threshold(self, obj: Prediction) -> float:
        threshold = self.context.get("threshold")
        return float(threshold if threshold is not None else self.context["request"].user.review_threshold)

    def get_url(self, obj: Prediction) -> str:
        return absolute(self.context.get("request"), "prediction-detail", uid=obj.uid)

    @extend_schema_field(serializers.DictField(child=serializers.FloatField()))
    def get_probabilities(self, obj: Prediction) -> dict[str, float]:
        return obj.probability_of()

    def get_threshold(self, obj: Prediction) -> float:
        return self._threshold(obj)

    def get_needs_review(self, obj: Prediction) -> bool:
        return obj.needs_review(self._threshold(obj))

    @extend_schema_field(ModelRefSerializer)
    def get_model(self, obj: Prediction) -> dict:
        return model_ref(obj.model)

    @extend_schema_field(NormalizationSerializer)
    def get_normalization(self, obj: Prediction) -> dict:
        return obj.normalization or obj.model.normalization

    @extend_schema_field(SaliencyUrlsSerializer)
    def get_saliency(self, obj: Prediction) -> dict:
        base = absolute(self.context.get("request"), "prediction-saliency", uid=obj.uid)
        return {method: f"{base}?method={method}" for method in ("gradcam", "gradient")}

    @extend_schema_field(serializers.UUIDField(allow_null=True))
    def get_batch(self, obj: Prediction) -> str | None:
        item = getattr(obj, "batch_item", None)
        return str(item.batch.uid) if item is not None else None


class ThresholdQuerySerializer(serializers.Serializer):
    threshold = threshold_field(
        required=False,
        help_text=f"{THRESHOLD_HELP} Default: the batch's threshold (batches), your own (predictions).",
    )


class SaliencyQuerySerializer(serializers.Serializer):
    method = serializers.ChoiceField(choices=["gradcam", "gradient"], default="gradcam")


# --- batches ---------------------------------------------------------------------------------------------------


class BatchSubmitSerializer(serializers.Serializer):
    files = serializers.ListField(
        child=serializers.FileField(allow_empty_file=True),
        required=False,
        default=list,
        help_text="images (JPEG/PNG) and .zip archives; repeat the field for several files",
    )
    urls = serializers.ListField(
        child=serializers.CharField(max_length=2000),
        required=False,
        default=list,
        help_text="http(s) image URLs (in a form: repeat the field, or one URL per line)",
    )
    external_id = serializers.CharField(
        max_length=100, required=False, allow_blank=True, default="", help_text="the LIS sample/accession id"
    )
    name = serializers.CharField(
        max_length=200, required=False, allow_blank=True, help_text="default: the external id, else the time"
    )
    model = ScopedModelField(required=False, help_text="a model id from /models/ (default: your default model)")
    threshold = threshold_field(required=False)
    normalization = NormalizationField(required=False, allow_null=True, help_text="override the model's own")

    def validate_urls(self, urls: list[str]) -> list[str]:
        return [line.strip() for url in urls for line in url.splitlines() if line.strip()]

    def validate(self, attrs):
        if not attrs.get("files") and not attrs.get("urls"):
            raise serializers.ValidationError(
                {"files": ["No files were sent: add images, a .zip archive or urls."]}, code="required"
            )
        return attrs


class BatchJsonSubmitSerializer(BatchSubmitSerializer):
    """The JSON form of a batch submit (for the schema): URLs only."""

    files = None


class ProgressSerializer(serializers.Serializer):
    total = serializers.IntegerField()
    done = serializers.IntegerField()
    failed = serializers.IntegerField()
    pending = serializers.IntegerField()
    percent = serializers.FloatField(help_text="done and failed, of total")
    eta_seconds = serializers.FloatField(allow_null=True, help_text="time left, estimated from the pace so far")


class ClassTallySerializer(serializers.Serializer):
    class_name = serializers.CharField()
    count = serializers.IntegerField()
    fraction = serializers.FloatField(help_text="of the classified images, 0–1")
    percent = serializers.FloatField(help_text="the same in percent, 0–100")


class DifferentialSerializer(serializers.Serializer):
    threshold = serializers.FloatField()
    classified = serializers.IntegerField()
    failed = serializers.IntegerField()
    pending = serializers.IntegerField()
    needs_review = serializers.IntegerField(help_text="classified images below the threshold, or outliers")
    mean_processing_ms = serializers.FloatField()
    classes = ClassTallySerializer(many=True)


class BatchResultSerializer(serializers.Serializer):
    position = serializers.IntegerField()
    filename = serializers.CharField()
    status = serializers.ChoiceField(choices=BatchItem.Status.choices)
    error = serializers.CharField(allow_blank=True, help_text="why the image could not be classified")
    prediction = serializers.UUIDField(allow_null=True)
    prediction_url = serializers.URLField(allow_null=True)
    predicted_class = serializers.CharField(allow_null=True)
    confidence = serializers.FloatField(allow_null=True)
    needs_review = serializers.BooleanField(allow_null=True)
    is_outlier = serializers.BooleanField(allow_null=True)
    probabilities = serializers.DictField(child=serializers.FloatField(), allow_null=True)
    processing_ms = serializers.FloatField(allow_null=True)


class BatchLinksSerializer(serializers.Serializer):
    report_csv = serializers.URLField()
    summary_csv = serializers.URLField()
    evaluations = serializers.URLField()
    web = serializers.URLField()


class BatchSummarySerializer(serializers.Serializer):
    """A batch as listed: identity, state and counts."""

    id = serializers.UUIDField(source="uid")
    url = serializers.SerializerMethodField()
    name = serializers.CharField()
    external_id = serializers.CharField()
    status = serializers.ChoiceField(choices=Batch.Status.choices)
    error = serializers.CharField()
    model = serializers.SerializerMethodField()
    threshold = serializers.FloatField(help_text="the batch's review threshold")
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    progress = serializers.SerializerMethodField()

    def get_url(self, batch: Batch) -> str:
        return absolute(self.context.get("request"), "batch-detail", uid=batch.uid)

    @extend_schema_field(ModelRefSerializer)
    def get_model(self, batch: Batch) -> dict:
        return model_ref(batch.model)

    @extend_schema_field(ProgressSerializer)
    def get_progress(self, batch: Batch) -> dict:
        counts = self.context.get("counts", {}).get(batch.pk) or {}
        return progress_of(batch, counts)


def progress_of(batch: Batch, counts: dict) -> dict:
    """Progress from per-status item counts (the same estimate as the web page's progress bar)."""
    from django.utils import timezone

    done, failed = counts.get(BatchItem.Status.DONE, 0), counts.get(BatchItem.Status.FAILED, 0)
    total = sum(counts.values())
    pending = total - done - failed
    eta = None
    if batch.started_at and done and not batch.is_finished:
        elapsed = (timezone.now() - batch.started_at).total_seconds()
        eta = round(elapsed / done * pending, 1)
    percent = round((done + failed) / total * 100, 1) if total else 100.0
    return {"total": total, "done": done, "failed": failed, "pending": pending, "percent": percent, "eta_seconds": eta}


class BatchDetailSerializer(BatchSummarySerializer):
    """A batch with its progress and, once finished, its differential and per-image results."""

    normalization = NormalizationField(read_only=True, allow_null=True, help_text="null: the model's own")
    links = serializers.SerializerMethodField()
    differential = serializers.SerializerMethodField(help_text="null until the batch is finished")
    results = serializers.SerializerMethodField(help_text="every image in order (null until the batch is finished)")

    @extend_schema_field(BatchLinksSerializer)
    def get_links(self, batch: Batch) -> dict:
        request = self.context.get("request")
        web = reverse("reports:batch", kwargs={"uid": batch.uid})
        return {
            "report_csv": absolute(request, "batch-report", uid=batch.uid),
            "summary_csv": absolute(request, "batch-summary", uid=batch.uid),
            "evaluations": absolute(request, "batch-evaluations", uid=batch.uid),
            "web": request.build_absolute_uri(web) if request is not None else web,
        }

    @extend_schema_field(DifferentialSerializer(allow_null=True))
    def get_differential(self, batch: Batch) -> dict | None:
        report = self.context.get("report")
        if report is None:
            return None
        return {
            "threshold": report.threshold,
            "classified": report.classified,
            "failed": len(report.failed),
            "pending": report.pending,
            "needs_review": report.needs_review,
            "mean_processing_ms": round(report.mean_ms, 3),
            "classes": [
                {
                    "class_name": tally.name,
                    "count": tally.count,
                    "fraction": tally.percent,
                    "percent": round(tally.percent * 100, 2),
                }
                for tally in report.tallies
            ],
        }

    @extend_schema_field(BatchResultSerializer(many=True, allow_null=True))
    def get_results(self, batch: Batch) -> list[dict] | None:
        report = self.context.get("report")
        if report is None:
            return None
        request = self.context.get("request")
        rows = []
        for item in report.items:
            p = item.prediction
            row = {
                "position": item.position,
                "filename": item.original_filename,
                "status": item.status,
                "error": item.error,
                "prediction": None,
                "prediction_url": None,
                "predicted_class": None,
                "confidence": None,
                "needs_review": None,
                "is_outlier": None,
                "probabilities": None,
                "processing_ms": None,
            }
            if p is not None:
                row.update(
                    prediction=str(p.uid),
                    prediction_url=absolute(request, "prediction-detail", uid=p.uid),
                    predicted_class=p.predicted_class,
                    confidence=p.confidence,
                    needs_review=p.needs_review(report.threshold),
                    is_outlier=p.is_outlier,
                    probabilities=dict(zip(report.class_names, p.probabilities, strict=False)),
                    processing_ms=p.processing_ms,
                )
            rows.append(row)
        return rows


class BatchListQuerySerializer(serializers.Serializer):
    external_id = serializers.CharField(
        required=False, allow_blank=True, max_length=100, help_text="exact LIS sample id (empty: batches without one)"
    )
    status = serializers.ChoiceField(required=False, choices=Batch.Status.choices)
    created_after = serializers.CharField(
        required=False, help_text="ISO date or date-time; a date starts at 00:00 (inclusive)"
    )
    created_before = serializers.CharField(
        required=False, help_text="ISO date or date-time; a date includes that whole day"
    )

    def _moment(self, value: str, *, end_of_day: bool):
        from datetime import datetime, time, timedelta

        from django.utils import timezone
        from django.utils.dateparse import parse_date, parse_datetime

        value = value.strip()
        try:
            day = parse_date(value) if len(value) == 10 else None  # 2026-03-01: a whole day
            moment = None if day is not None else parse_datetime(value)
        except ValueError:
            moment = day = None
        if moment is None and day is None:
            raise serializers.ValidationError("Use an ISO date (2026-03-01) or date-time (2026-03-01T08:00:00Z).")
        if day is not None:
            moment = datetime.combine(day + timedelta(days=1) if end_of_day else day, time.min)
        if timezone.is_naive(moment):
            moment = timezone.make_aware(moment)
        return moment

    def validate_created_after(self, value: str):
        return self._moment(value, end_of_day=False)

    def validate_created_before(self, value: str):
        return self._moment(value, end_of_day=True)


# --- evaluation runs (true labels) -----------------------------------------------------------------------------


class LabelsUploadSerializer(serializers.Serializer):
    labels = serializers.FileField(
        allow_empty_file=True, help_text="CSV with a header filename,class and one row per image"
    )
    threshold = threshold_field(required=False, help_text="default: the batch's threshold")


class EvaluationRunSerializer(serializers.Serializer):
    id = serializers.UUIDField(source="uid")
    url = serializers.SerializerMethodField()
    batch = serializers.SerializerMethodField()
    model = serializers.SerializerMethodField()
    threshold = serializers.FloatField()
    labels_filename = serializers.CharField()
    labels_sha256 = serializers.CharField()
    n_labelled = serializers.IntegerField(help_text="classified images with a usable label")
    metrics = serializers.SerializerMethodField(
        help_text="accuracy, kappa, per-class metrics… for all/confident/flagged"
    )
    problems = serializers.SerializerMethodField(help_text="rows and images that could not be used, with reasons")
    created_at = serializers.DateTimeField()

    def get_url(self, run) -> str:
        return absolute(self.context.get("request"), "evaluation-detail", uid=run.uid)

    @extend_schema_field(
        {
            "type": "object",
            "properties": {"id": {"type": "string", "format": "uuid"}, "url": {"type": "string"}},
            "required": ["id", "url"],
        }
    )
    def get_batch(self, run) -> dict:
        return {
            "id": str(run.batch.uid),
            "url": absolute(self.context.get("request"), "batch-detail", uid=run.batch.uid),
        }

    @extend_schema_field(ModelRefSerializer)
    def get_model(self, run) -> dict:
        return {"id": run.model_id, "name": run.model.name, "version": run.model_version}

    @extend_schema_field({"type": "object", "additionalProperties": True})
    def get_metrics(self, run) -> dict:
        return run.metrics

    @extend_schema_field({"type": "object", "additionalProperties": True})
    def get_problems(self, run) -> dict:
        return run.problems


# --- tokens and the caller -------------------------------------------------------------------------------------


class ApiTokenSerializer(serializers.ModelSerializer):
    prefix = serializers.CharField(source="shown_prefix", read_only=True, help_text="how to recognise the key")
    is_active = serializers.BooleanField(read_only=True)

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "is_active", "created_at", "last_used_at", "revoked_at"]
        read_only_fields = ["id", "prefix", "is_active", "created_at", "last_used_at", "revoked_at"]
        extra_kwargs = {"name": {"help_text": "what the token is for, e.g. “LIS production”"}}


class NewApiTokenSerializer(ApiTokenSerializer):
    key = serializers.SerializerMethodField(help_text="the key: shown once, store it now")

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "key"]

    def get_key(self, obj) -> str:
        return self.context["key"]


class MeSerializer(serializers.Serializer):
    username = serializers.CharField()
    laboratory = serializers.CharField(allow_null=True)
    review_threshold = serializers.FloatField()
    default_model = ModelRefSerializer(allow_null=True)
    can_classify = serializers.BooleanField()
    authenticated_by = serializers.ChoiceField(choices=["token", "session"])
    limits = serializers.DictField(child=serializers.JSONField(), help_text="upload limits and request rates")


def limits_payload() -> dict:
    return {
        "max_image_bytes": settings.WBC_MAX_IMAGE_BYTES,
        "max_image_pixels": settings.WBC_MAX_IMAGE_PIXELS,
        "batch_max_files": settings.WBC_BATCH_MAX_FILES,
        "batch_max_bytes": settings.WBC_BATCH_MAX_BYTES,
        "batch_max_urls": settings.WBC_BATCH_MAX_URLS,
        "rate": settings.WBC_API_RATE,
        "submit_rate": settings.WBC_API_SUBMIT_RATE,
    }
