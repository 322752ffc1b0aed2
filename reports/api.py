"""The LIS API for batches and evaluation runs (/api/v1/batches/, /api/v1/evaluations/).

Split from :mod:`classifier.api` by feature; the same helpers, permissions and error shapes apply.
"""

from __future__ import annotations

import re

from django.conf import settings
from django.db import IntegrityError
from django.db.models import Count
from django.http import HttpResponse
from django.utils import timezone
from django.utils.text import slugify
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import UnsupportedMediaType
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from accounts.scoping import get_scoped_or_404, scoped
from classifier.api import default_model_for
from classifier.serializers import ThresholdQuerySerializer
from classifier.services import remember_model
from wbcsite.api_base import MB, UUID_PATTERN, CSVRenderer, LabApiMixin, error_response, validated_query
from wbcsite.api_errors import ApiError, Conflict, PayloadTooLarge

from .bundles import stored_contents
from .differential import build_differential, report_rows, summary_rows, to_csv
from .heartbeat import worker_state
from .labels import MAX_LABEL_BYTES, LabelFileError
from .models import Batch, BatchItem, EvaluationRun
from .review import SlideLocked, set_wbc_count
from .serializers import (
    BatchDetailSerializer,
    BatchJsonSubmitSerializer,
    BatchListQuerySerializer,
    BatchSubmitSerializer,
    BatchSummarySerializer,
    EvaluationRunSerializer,
    LabelsUploadSerializer,
    WbcCountSerializer,
)
from .services import Refused, create_evaluation
from .submission import batch_limits, submit_batch, url_entries
from .uploads import NamedBytes, UploadRefused, expand_uploads

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,200}$")  # visible ASCII, as the header allows

# --- batches ---------------------------------------------------------------------------------------------------


def _expand_files(files, urls: list[str] = ()) -> list[NamedBytes]:
    try:
        return expand_uploads(files, batch_limits()) + (url_entries(list(urls), name_by_url=True) if urls else [])
    except UploadRefused as exc:
        raise PayloadTooLarge(str(exc), code="batch_too_large") from exc


def _same_submission(batch: Batch, data: dict, files: list) -> bool:
    """Does a retried request carry the payload this batch was made from? Only what the client sent counts."""
    if data.get("model") is not None and data["model"].pk != batch.model_id:
        return False
    if data.get("threshold") is not None and abs(data["threshold"] - batch.threshold) > 1e-9:
        return False
    if data.get("name") and data["name"][:200] != batch.name:
        return False
    if data.get("normalization") and data["normalization"] != batch.normalization:
        return False
    if data.get("wbc_count") is not None and data["wbc_count"] != batch.wbc_count:
        return False
    if (data.get("external_id") or "")[:100] != batch.external_id:
        return False
    for uploaded in files:
        uploaded.seek(0)  # the request may have read them already (a lost race)
    try:
        expected = [(e.name[-255:], e.data) for e in _expand_files(files)]
    except PayloadTooLarge:
        return False
    expected += [(entry.name[-255:], None) for entry in url_entries(list(data.get("urls") or []), name_by_url=True)]
    items = list(batch.items.order_by("position", "id"))
    if [name for name, _ in expected] != [item.original_filename for item in items]:
        return False
    stored = stored_contents(batch)
    for (_, content), item in zip(expected, items, strict=True):
        if content is not None and item.position in stored and stored[item.position] != content:
            return False
    return True


IDEMPOTENCY_PARAM = OpenApiParameter(
    IDEMPOTENCY_HEADER,
    OpenApiTypes.STR,
    location=OpenApiParameter.HEADER,
    description=(
        "Any unique string (≤200 visible ASCII characters), e.g. a UUID per sample. A retry with the same key "
        "and payload returns the same batch (200) and creates nothing; the same key with another payload is a 409."
    ),
)


@extend_schema_view(
    list=extend_schema(
        summary="List your laboratory's batches, newest first", parameters=[BatchListQuerySerializer], tags=["batches"]
    ),
)
class BatchViewSet(LabApiMixin, mixins.ListModelMixin, viewsets.GenericViewSet):
    serializer_class = BatchSummarySerializer
    lookup_field = "uid"
    lookup_value_regex = UUID_PATTERN
    submit_actions = frozenset({"create", "evaluations_create"})

    def get_queryset(self):
        return scoped(Batch.objects.select_related("model"), self.request.user).order_by("-created_at", "-id")

    def get_batch(self) -> Batch:
        return get_scoped_or_404(
            Batch.objects.select_related("model", "user"), self.request.user, uid=self.kwargs["uid"]
        )

    def _counts(self, batches) -> dict[int, dict[str, int]]:
        counts: dict[int, dict[str, int]] = {batch.pk: {} for batch in batches}
        rows = (
            BatchItem.objects.filter(batch_id__in=list(counts))
            .values_list("batch_id", "status")
            .annotate(n=Count("id"))
        )
        for batch_id, item_status, n in rows:
            counts[batch_id][item_status] = n
        return counts

    def list(self, request, *args, **kwargs):
        filters = validated_query(BatchListQuerySerializer, request)
        queryset = self.get_queryset()
        if filters.get("external_id") is not None:
            queryset = queryset.filter(external_id=filters["external_id"])
        if filters.get("status"):
            queryset = queryset.filter(status=filters["status"])
        if filters.get("created_after"):
            queryset = queryset.filter(created_at__gte=filters["created_after"])
        if filters.get("created_before"):
            queryset = queryset.filter(created_at__lt=filters["created_before"])
        page = self.paginate_queryset(queryset)
        context = {**self.get_serializer_context(), "counts": self._counts(page), "worker": worker_state()}
        return self.get_paginated_response(BatchSummarySerializer(page, many=True, context=context).data)

    def _detail(self, batch: Batch, threshold: float | None = None) -> dict:
        context = {**self.get_serializer_context(), "counts": self._counts([batch]), "worker": worker_state()}
        if batch.is_finished:
            context["report"] = build_differential(batch, batch.threshold if threshold is None else threshold)
        return BatchDetailSerializer(batch, context=context).data

    @extend_schema(
        summary="Batch status, progress and (once finished) the differential and per-image results",
        parameters=[ThresholdQuerySerializer],
        responses={200: BatchDetailSerializer},
        tags=["batches"],
    )
    def retrieve(self, request, uid=None):
        batch = self.get_batch()
        threshold = validated_query(ThresholdQuerySerializer, request).get("threshold")
        return Response(self._detail(batch, threshold))  # nothing re-queued here: the worker recovers batches

    @extend_schema(
        summary="Set or clear the sample's total WBC count (gives absolute counts); refused once the slide is signed",
        request={"application/json": WbcCountSerializer},
        responses={
            200: BatchDetailSerializer,
            409: error_response("The slide is signed: amend it first."),
            415: error_response("The body is not JSON."),
        },
        tags=["batches"],
    )
    def partial_update(self, request, uid=None):
        batch = self.get_batch()
        if not (request.content_type or "").startswith("application/json"):
            raise UnsupportedMediaType(request.content_type, 'Send the WBC count as JSON: {"wbc_count": 7.4}.')
        serializer = WbcCountSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        try:
            set_wbc_count(batch, serializer.validated_data["wbc_count"])
        except SlideLocked as exc:
            raise Conflict(str(exc), code="slide_locked") from exc
        return Response(self._detail(batch))

    def _idempotency_key(self, request) -> str:
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is None:
            return ""
        key = key.strip()
        if not IDEMPOTENCY_KEY_PATTERN.match(key):
            raise ApiError(
                f"The {IDEMPOTENCY_HEADER} header must be 1–200 visible ASCII characters (a UUID is ideal).",
                code="invalid_idempotency_key",
            )
        return key

    def _replay(self, batch: Batch, data: dict, files: list, key: str) -> Response:
        if not _same_submission(batch, data, files):
            raise Conflict(
                f"The {IDEMPOTENCY_HEADER} “{key}” was already used for another request (batch {batch.uid}); "
                "use a new key for a new batch.",
                code="idempotency_key_reused",
                details={"batch": str(batch.uid)},
            )
        body = self._detail(batch)
        return Response(
            body, status=status.HTTP_200_OK, headers={"Location": body["url"], "Idempotent-Replayed": "true"}
        )

    @extend_schema(
        summary="Submit a batch (a slide's images) for background classification",
        description=(
            "Multipart with repeated `files` (images and .zip archives) and/or `urls`; JSON with `urls`. "
            "Answers 202 with the batch (and a Location header) at once; poll the batch until `status` is "
            "`done`. URLs are downloaded by the worker, not during the request (each within "
            "`WBC_URL_FETCH_SECONDS`, all of a batch within `WBC_BATCH_URL_BUDGET_SECONDS`): until then they are "
            "pending, and one that cannot be downloaded becomes a failed item with its reason. `user:password@` "
            "in a URL is refused and never stored. "
            "Files that cannot be read become failed items with their reason; if every file is bad "
            f"the request is refused (400) and nothing is stored. Send an `{IDEMPOTENCY_HEADER}` header to make "
            "retries safe."
        ),
        parameters=[IDEMPOTENCY_PARAM],
        request={"multipart/form-data": BatchSubmitSerializer, "application/json": BatchJsonSubmitSerializer},
        responses={
            202: BatchDetailSerializer,
            200: OpenApiResponse(BatchDetailSerializer, description="a retry with the same Idempotency-Key"),
            409: error_response("The Idempotency-Key was used for a different payload."),
            413: error_response("Over the batch limits (files, bytes, URLs)."),
        },
        tags=["batches"],
    )
    def create(self, request, *args, **kwargs):
        key = self._idempotency_key(request)
        serializer = BatchSubmitSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        files = data.get("files") or []
        if key:
            existing = scoped(Batch, request.user).filter(idempotency_key=key).first()
            if existing is not None:
                return self._replay(existing, data, files, key)
        model_record = data.get("model") or default_model_for(request.user)
        if len(data["urls"]) > settings.WBC_BATCH_MAX_URLS:  # refused before anything is read or fetched
            raise PayloadTooLarge(
                f"Too many URLs: at most {settings.WBC_BATCH_MAX_URLS} per batch.",
                code="batch_too_large",
                details={"urls": len(data["urls"]), "limit": settings.WBC_BATCH_MAX_URLS},
            )
        entries = _expand_files(files, data["urls"])
        if not entries:
            raise ApiError("No images were found in the upload (the archives are empty).", code="no_images")
        name = data.get("name") or data["external_id"] or f"Sample {timezone.localtime():%Y-%m-%d %H:%M:%S}"
        try:
            batch = submit_batch(
                request.user,
                entries,
                model_record,
                name=name,
                external_id=data["external_id"],
                threshold=data.get("threshold"),
                idempotency_key=key,
                normalization=data.get("normalization"),
            )
            if data.get("wbc_count") is not None:
                set_wbc_count(batch, data["wbc_count"])
        except IntegrityError:
            existing = scoped(Batch, request.user).filter(idempotency_key=key).first() if key else None
            if existing is None:
                raise
            return self._replay(existing, data, files, key)  # lost the race to a concurrent retry
        if batch.status == Batch.Status.DONE:  # done at once: nothing was left for the worker (submit_batch)
            reasons = list(batch.items.order_by("position", "id").values("original_filename", "error"))
            batch.delete()  # every file was refused: store nothing (refused files have no stored image)
            raise ApiError(
                "None of the files could be used; nothing was stored.",
                code="all_files_rejected",
                details={"files": [{"file": r["original_filename"], "reason": r["error"]} for r in reasons]},
            )
        remember_model(request.user, model_record)
        body = self._detail(batch)
        return Response(body, status=status.HTTP_202_ACCEPTED, headers={"Location": body["url"]})

    def _csv(self, request, rows_function, suffix: str) -> HttpResponse:
        batch = get_scoped_or_404(Batch.objects.select_related("model"), request.user, uid=self.kwargs["uid"])
        threshold = validated_query(ThresholdQuerySerializer, request).get("threshold")
        report = build_differential(batch, batch.threshold if threshold is None else threshold)
        response = HttpResponse(to_csv(rows_function(report)), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{slugify(batch.name) or "batch"}-{suffix}.csv"'
        return response

    @extend_schema(
        summary="The per-image report as CSV (the same bytes as the web page's download at that threshold)",
        parameters=[ThresholdQuerySerializer],
        responses={(200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="one row per classified image")},
        tags=["batches"],
    )
    @action(detail=True, methods=["get"], renderer_classes=[CSVRenderer, JSONRenderer])
    def report(self, request, uid=None):
        return self._csv(request, report_rows, "report")

    @extend_schema(
        summary="The differential summary as CSV (the same bytes as the web page's download)",
        parameters=[ThresholdQuerySerializer],
        responses={(200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="one row per class")},
        tags=["batches"],
    )
    @action(detail=True, methods=["get"], renderer_classes=[CSVRenderer, JSONRenderer])
    def summary(self, request, uid=None):
        return self._csv(request, summary_rows, "summary")

    @extend_schema(
        summary="The evaluation runs of this batch (true labels attached)",
        parameters=[
            OpenApiParameter("page", OpenApiTypes.INT, description="page number, from 1"),
            OpenApiParameter("page_size", OpenApiTypes.INT, description="items per page (at most 100)"),
        ],
        responses={200: EvaluationRunSerializer(many=True)},
        tags=["evaluations"],
    )
    @action(detail=True, methods=["get"], url_path="evaluations", url_name="evaluations")
    def evaluations(self, request, uid=None):
        batch = self.get_batch()
        runs = scoped(EvaluationRun.objects.select_related("batch", "model"), request.user).filter(batch=batch)
        page = self.paginate_queryset(runs.order_by("-created_at", "-id"))
        return self.get_paginated_response(
            EvaluationRunSerializer(page, many=True, context=self.get_serializer_context()).data
        )

    @extend_schema(
        summary="Attach true labels (a filename,class CSV) to a finished batch: an evaluation run",
        request={"multipart/form-data": LabelsUploadSerializer},
        responses={
            201: EvaluationRunSerializer,
            409: error_response("The batch is not finished yet."),
            413: error_response("The label file is larger than 5 MB."),
        },
        tags=["evaluations"],
    )
    @evaluations.mapping.post
    def evaluations_create(self, request, uid=None):
        batch = self.get_batch()
        serializer = LabelsUploadSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        upload, threshold = serializer.validated_data["labels"], serializer.validated_data.get("threshold")
        if upload.size is not None and upload.size > MAX_LABEL_BYTES:
            raise PayloadTooLarge(f"The label file is too large: at most {MAX_LABEL_BYTES // MB} MB.")
        if batch.status != Batch.Status.DONE:
            raise Conflict(
                "The batch is not finished yet: attach labels once every image has been classified.",
                code="batch_not_finished",
                details={"status": batch.status},
            )
        try:
            run = create_evaluation(request.user, batch, upload.read(), upload.name or "", threshold)
        except LabelFileError as exc:
            raise ApiError(str(exc), code="invalid_labels", details={"labels": [str(exc)]}) from exc
        except Refused as exc:
            raise ApiError(str(exc), code="labels_refused", details={"labels": [str(exc)]}) from exc
        body = EvaluationRunSerializer(run, context=self.get_serializer_context()).data
        return Response(body, status=status.HTTP_201_CREATED, headers={"Location": body["url"]})


# --- evaluation runs -------------------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="List your laboratory's evaluation runs, newest first", tags=["evaluations"]),
    retrieve=extend_schema(summary="One evaluation run: metrics and problems", tags=["evaluations"]),
)
class EvaluationRunViewSet(LabApiMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = EvaluationRunSerializer
    lookup_field = "uid"
    lookup_value_regex = UUID_PATTERN

    def get_queryset(self):
        return scoped(EvaluationRun.objects.select_related("batch", "model"), self.request.user).order_by(
            "-created_at", "-id"
        )

    def get_object(self):
        return get_scoped_or_404(self.get_queryset(), self.request.user, uid=self.kwargs["uid"])
