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

from accounts.scoping import scoped
from wbc_ml.preprocessing import MEAN_RANGE, STD_RANGE, Normalization
from wbc_ml.review_flag import THRESHOLD_MAX, THRESHOLD_MIN

from .models import ClassifierModel, Prediction

THRESHOLD_HELP = f"Review threshold, {THRESHOLD_MIN:.2f}–{THRESHOLD_MAX:.2f}: below it (or an outlier) needs review."


def absolute(request, name: str, **kwargs) -> str:
    path = reverse(f"api:{name}", kwargs=kwargs)
    return request.build_absolute_uri(path) if request is not None else path


def threshold_field(**kwargs) -> serializers.FloatField:
    kwargs.setdefault("help_text", THRESHOLD_HELP)
    return serializers.FloatField(min_value=THRESHOLD_MIN, max_value=THRESHOLD_MAX, **kwargs)


# --- shared pieces ---------------------------------------------------------------------------------------------


class NormalizationSerializer(serializers.Serializer):
    """The schema of an override; the rule itself is ``Normalization.validate`` (NormalizationField applies it)."""

    method = serializers.ChoiceField(choices=["scale01", "zscore"])
    mean = serializers.ListField(
        child=serializers.FloatField(min_value=MEAN_RANGE[0], max_value=MEAN_RANGE[1]),
        min_length=3,
        max_length=3,
        required=False,
        help_text="per channel, for 0–255 pixels",
    )
    std = serializers.ListField(
        child=serializers.FloatField(min_value=STD_RANGE[0], max_value=STD_RANGE[1]),
        min_length=3,
        max_length=3,
        required=False,
        help_text="per channel, for 0–255 pixels",
    )


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
        if user is None:
            return ClassifierModel.objects.none()
        return scoped(ClassifierModel.objects.usable().defer("card"), user)  # the card: see Prediction.with_model


class ModelRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    version = serializers.CharField()
    sha256 = serializers.CharField(help_text="SHA-256 of the model file")


def model_ref(record: ClassifierModel) -> dict:
    return {"id": record.pk, "name": record.name, "version": record.version, "sha256": record.sha256}


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
    saliency = serializers.SerializerMethodField(help_text="WebP overlays (made on first request)")
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


# --- the caller -------------------------------------------------------------------------------------


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
