"""Serializers of the LIS API for batches and evaluation runs (split from :mod:`classifier.serializers`)."""

from __future__ import annotations

from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from classifier.serializers import (
    ModelRefSerializer,
    NormalizationField,
    ScopedModelField,
    absolute,
    model_ref,
    threshold_field,
)

from .differential import effective_class, verification_of
from .models import Batch, BatchItem
from .review import differential_payload, slide_state


class JsonNumberField(serializers.FloatField):
    """A float that must be a JSON number in a JSON body (a form field is text and is parsed as usual)."""

    def to_internal_value(self, data):
        request = self.context.get("request")
        in_json = request is not None and (request.content_type or "").startswith("application/json")
        if isinstance(data, bool) or (in_json and isinstance(data, str)):
            self.fail("invalid")
        return super().to_internal_value(data)


def _moment(value) -> str | None:
    """A date-time as DRF writes it (the same format as the serializers' DateTimeFields)."""
    return None if value is None else serializers.DateTimeField().to_representation(value)


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
    wbc_count = JsonNumberField(
        required=False,
        allow_null=True,
        min_value=0.0,
        max_value=1000.0,
        help_text="the sample's total WBC count, ×10⁹/L (optional: gives absolute counts)",
    )

    def validate_urls(self, urls: list[str]) -> list[str]:
        return [line.strip() for url in urls for line in url.splitlines() if line.strip()]

    def validate(self, attrs):
        if not attrs.get("files") and not attrs.get("urls"):
            raise serializers.ValidationError(
                {"files": ["No files were sent: add images, a .zip archive or urls."]}, code="required"
            )
        return attrs


class WbcCountSerializer(serializers.Serializer):
    wbc_count = JsonNumberField(
        allow_null=True, min_value=0.0, max_value=1000.0, help_text="total WBC count, ×10⁹/L (null clears it)"
    )


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
    count = serializers.IntegerField(help_text="cells of this class by effective class (verified, else the AI's)")
    fraction = serializers.FloatField(help_text="of the counted white cells, 0–1")
    percent = serializers.FloatField(help_text="the same in percent, 0–100")
    reference_low = serializers.FloatField(allow_null=True, help_text="the lab's reference range, percent")
    reference_high = serializers.FloatField(allow_null=True)
    flag = serializers.CharField(help_text="H above, L below, N inside the range (edges are N); empty: no range")
    absolute = serializers.FloatField(allow_null=True, help_text="×10⁹/L, when the batch has wbc_count")


class CategoryTallySerializer(serializers.Serializer):
    key = serializers.CharField()
    label = serializers.CharField()
    count = serializers.IntegerField()
    per_100_wbc = serializers.FloatField(allow_null=True)


class AgreementSerializer(serializers.Serializer):
    verified = serializers.IntegerField(help_text="cells with a technologist's class")
    agreeing = serializers.IntegerField(help_text="of those, the ones where it equals the AI's class")
    share = serializers.FloatField(allow_null=True)
    per_class = serializers.ListField(child=serializers.DictField(), help_text="the same per AI class")


class ReviewStateSerializer(serializers.Serializer):
    state = serializers.CharField(help_text="in review, awaiting countersign, final or amending")
    version = serializers.IntegerField(allow_null=True, help_text="the latest report version (null: none yet)")
    locked = serializers.BooleanField(help_text="the latest version is signed: no reclassification")
    to_review = serializers.IntegerField(help_text="flagged cells without a technologist's class")
    verified = serializers.IntegerField()
    signed_by = serializers.CharField(allow_null=True)
    signed_at = serializers.DateTimeField(allow_null=True)
    countersigned_by = serializers.CharField(allow_null=True)
    countersigned_at = serializers.DateTimeField(allow_null=True)


class DifferentialSerializer(serializers.Serializer):
    threshold = serializers.FloatField()
    classified = serializers.IntegerField()
    failed = serializers.IntegerField()
    pending = serializers.IntegerField()
    needs_review = serializers.IntegerField(help_text="classified images below the threshold, or outliers")
    mean_processing_ms = serializers.FloatField()
    wbc_counted = serializers.IntegerField(help_text="white cells in the differential (non-WBC categories left out)")
    count_target = serializers.IntegerField(help_text="the lab's cells to count per slide (100 or 200)")
    short = serializers.BooleanField(help_text="fewer white cells than the target")
    classes = ClassTallySerializer(many=True)
    non_wbc = CategoryTallySerializer(many=True, help_text="non-WBC categories, per 100 WBC")
    agreement = AgreementSerializer(help_text="AI vs technologist (pre-classification agreement)")
    out_of_scope = serializers.DictField(help_text="share of flagged cells, the lab's limit, and whether it warns")


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
    verified_class = serializers.CharField(allow_null=True, help_text="the technologist's class (null: not verified)")
    verified_by = serializers.CharField(allow_null=True)
    verified_at = serializers.DateTimeField(allow_null=True)
    effective_class = serializers.CharField(allow_null=True, help_text="verified class, else the AI's")


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
        worker = self.context.get("worker")
        return progress_of(batch, counts, worker_running=worker is None or worker.alive)


def progress_of(batch: Batch, counts: dict, *, worker_running: bool = True) -> dict:
    """Progress from per-status item counts (the same estimate as the web page's progress bar; none while no
    worker runs)."""
    from django.utils import timezone

    done, failed = counts.get(BatchItem.Status.DONE, 0), counts.get(BatchItem.Status.FAILED, 0)
    total = sum(counts.values())
    pending = total - done - failed
    eta = None
    if batch.started_at and done and not batch.is_finished and worker_running:
        elapsed = (timezone.now() - batch.started_at).total_seconds()
        eta = round(elapsed / done * pending, 1)
    percent = round((done + failed) / total * 100, 1) if total else 100.0
    return {"total": total, "done": done, "failed": failed, "pending": pending, "percent": percent, "eta_seconds": eta}


class BatchDetailSerializer(BatchSummarySerializer):
    """A batch with its progress and, once finished, its differential and per-image results."""

    normalization = NormalizationField(read_only=True, allow_null=True, help_text="null: the model's own")
    worker_warning = serializers.SerializerMethodField(
        help_text="null, unless the batch waits for a worker that is not running: then since when, in words"
    )
    links = serializers.SerializerMethodField()
    wbc_count = serializers.FloatField(allow_null=True, help_text="total WBC count, ×10⁹/L (gives absolute counts)")
    review = serializers.SerializerMethodField(help_text="review and sign-off state (null until the batch is finished)")
    differential = serializers.SerializerMethodField(help_text="null until the batch is finished")
    results = serializers.SerializerMethodField(help_text="every image in order (null until the batch is finished)")

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_worker_warning(self, batch: Batch) -> str | None:
        worker = self.context.get("worker")
        if batch.is_finished or worker is None or worker.alive:
            return None
        return worker.message

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
            "failed": report.failed_count,
            "pending": report.pending,
            "needs_review": report.needs_review,
            "mean_processing_ms": round(report.mean_ms, 3),
            "wbc_counted": report.wbc_counted,
            "count_target": report.count_target,
            "short": report.short,
            "classes": [
                {
                    "class_name": tally.name,
                    "count": tally.count,
                    "fraction": tally.percent,
                    "percent": round(tally.percent * 100, 2),
                    "reference_low": tally.low,
                    "reference_high": tally.high,
                    "flag": tally.flag,
                    "absolute": tally.absolute,
                }
                for tally in report.tallies
            ],
            "non_wbc": [
                {"key": c.key, "label": c.label, "count": c.count, "per_100_wbc": c.per_100_wbc} for c in report.non_wbc
            ],
            "agreement": differential_payload(report)["agreement"],
            "out_of_scope": {**report.out_of_scope, "warning": report.out_of_scope_warning},
        }

    @extend_schema_field(ReviewStateSerializer(allow_null=True))
    def get_review(self, batch: Batch) -> dict | None:
        report = self.context.get("report")
        if report is None:
            return None
        current = slide_state(batch)
        latest = current.latest
        return {
            "state": current.state,
            "version": current.version,
            "locked": current.locked,
            "to_review": report.to_review,
            "verified": report.verified,
            "signed_by": latest.signed_by.get_username() if latest and latest.signed_by else None,
            "signed_at": _moment(latest.signed_at if latest else None),
            "countersigned_by": latest.countersigned_by.get_username() if latest and latest.countersigned_by else None,
            "countersigned_at": _moment(latest.countersigned_at if latest else None),
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
                "verified_class": None,
                "verified_by": None,
                "verified_at": None,
                "effective_class": None,
            }
            verification = verification_of(item)
            if verification is not None:
                row.update(
                    verified_class=verification.verified_class,
                    verified_by=verification.verified_by.get_username(),
                    verified_at=_moment(verification.verified_at),
                )
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
                    effective_class=effective_class(item),
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
        return {**model_ref(run.model), "version": run.model_version}

    @extend_schema_field({"type": "object", "additionalProperties": True})
    def get_metrics(self, run) -> dict:
        return run.metrics

    @extend_schema_field({"type": "object", "additionalProperties": True})
    def get_problems(self, run) -> dict:
        return run.problems
