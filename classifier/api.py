"""The REST API the laboratory information system (LIS) uses: /api/v1/ (routes in wbcsite/api_urls.py).

The views mirror the web pages (classifier/views.py, reports/views.py): the same services classify, submit,
report and evaluate, and every object is looked up through :mod:`accounts.scoping`, so another laboratory's
object is a 404. Errors have one JSON shape (see :mod:`wbcsite.api_errors`).
"""

from __future__ import annotations

import io

from django.conf import settings
from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from PIL import Image, UnidentifiedImageError
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import ApiRateThrottle, IsLabMember
from accounts.models import ApiToken
from accounts.scoping import get_scoped_or_404, scoped
from wbc_ml.preprocessing import ZIP_SIGNATURE, ImageRejected, sniff_image_type
from wbcsite.api_base import (
    MB,
    UUID_PATTERN,
    LabApiMixin,
    PNGRenderer,
    WebPRenderer,
    error_response,
    validated_query,
)
from wbcsite.api_errors import (
    ApiError,
    ImageRejectedError,
    PayloadTooLarge,
    UnsupportedImageType,
    UrlRefusedError,
)

from .fetch import UrlRefused, fetch_url
from .models import ClassifierModel, Prediction
from .serializers import (
    ClassifierModelSerializer,
    ClassifyMultipartSerializer,
    ClassifyUploadSerializer,
    ClassifyUrlSerializer,
    MeSerializer,
    PredictionSerializer,
    SaliencyQuerySerializer,
    ThresholdQuerySerializer,
    limits_payload,
    model_ref,
)
from .services import (
    UploadedImage,
    classify_image,
    ensure_saliency,
    read_upload,
    saliency_content_type,
    usable_models,
)


def default_model_for(user) -> ClassifierModel:
    """The model of an API request or batch sent without one: the laboratory's default (chosen by a Model admin) if
    still usable, else the first usable one. Never the user's remembered web dropdown choice (that is for the web
    pages only), so a click in the browser cannot change what the LIS gets."""
    models = usable_models(user)
    lab = user.laboratory if user.laboratory_id else None
    if lab is not None and lab.default_model_id and models.filter(pk=lab.default_model_id).exists():
        return models.get(pk=lab.default_model_id)
    first = models.first()
    if first is None:
        raise ApiError("No model is available to your laboratory; ask a model admin to activate one.", code="no_model")
    return first


def _describe(data: bytes) -> str:
    """What an unsupported upload looks like, for the 415 message."""
    if data.startswith(ZIP_SIGNATURE):
        return "a zip archive (send archives to /api/v1/batches/)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            return f"a {image.format} image"
    except (UnidentifiedImageError, OSError, ValueError):
        pass
    try:
        data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    return "text"


def read_single_image(uploaded) -> UploadedImage:
    """One uploaded image, or the right error: 413 over WBC_MAX_IMAGE_BYTES, 415 not JPEG/PNG, 400 empty."""
    name = uploaded.name or "image"
    limit = settings.WBC_MAX_IMAGE_BYTES
    too_large = PayloadTooLarge(
        f"{name}: the file is larger than the limit of {limit / MB:g} MB.",
        details={"file": name, "limit_bytes": limit},
    )
    if uploaded.size is not None and uploaded.size > limit:
        raise too_large
    try:
        upload = read_upload(uploaded)
    except ImageRejected as exc:
        raise ImageRejectedError(str(exc), details={"file": name}) from exc
    if len(upload.data) > limit:
        raise too_large
    if not upload.data:
        raise ImageRejectedError(f"{name}: the file is empty.", details={"file": name})
    if sniff_image_type(upload.data) is None:
        found = _describe(upload.data)
        raise UnsupportedImageType(
            f"{name}: {found} is not a supported image type; upload a JPEG or PNG.",
            details={"file": name, "detected": found},
        )
    return upload


# --- models ----------------------------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="List the models your laboratory can use", tags=["models"]),
    retrieve=extend_schema(summary="One model", tags=["models"]),
)
class ClassifierModelViewSet(LabApiMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = ClassifierModelSerializer

    def get_queryset(self):
        return usable_models(self.request.user).order_by("-is_bundled", "name", "-created_at", "id")

    def get_object(self):
        return get_scoped_or_404(self.get_queryset(), self.request.user, pk=self.kwargs["pk"])


# --- predictions -----------------------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(
        summary="List your laboratory's classified images, newest first",
        parameters=[ThresholdQuerySerializer],
        tags=["predictions"],
    ),
    retrieve=extend_schema(summary="One classified image", parameters=[ThresholdQuerySerializer], tags=["predictions"]),
)
class PredictionViewSet(LabApiMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = PredictionSerializer
    lookup_field = "uid"
    lookup_value_regex = UUID_PATTERN
    submit_actions = frozenset({"create"})

    def get_queryset(self):
        predictions = Prediction.objects.with_model()
        if self.action != "saliency":  # a map needs the prediction and its model only
            predictions = predictions.select_related("batch_item__batch")
        return scoped(predictions, self.request.user).order_by("-created_at", "-id")

    def get_object(self):
        return get_scoped_or_404(self.get_queryset(), self.request.user, uid=self.kwargs["uid"])

    def get_serializer_context(self):
        context = super().get_serializer_context()
        if getattr(self, "action", None) in ("retrieve", "list"):
            context["threshold"] = validated_query(ThresholdQuerySerializer, self.request).get("threshold")
        return context

    @extend_schema(
        summary="Classify one image (a file, or a URL the server fetches)",
        description=(
            "Multipart with `file` (JPEG/PNG, decided by content), or JSON/form with `url` (fetched through the "
            "server's safe fetcher: public http(s) addresses only). Runs synchronously and stores the result; "
            "the response links to the prediction and its saliency maps."
        ),
        request={"multipart/form-data": ClassifyMultipartSerializer, "application/json": ClassifyUrlSerializer},
        responses={
            201: PredictionSerializer,
            413: error_response("The file is larger than WBC_MAX_IMAGE_BYTES."),
            415: error_response("The upload is not a JPEG or PNG (by content): a GIF, a text file, a zip, …"),
            503: error_response("The model cannot be loaded right now."),
        },
        tags=["predictions"],
    )
    def create(self, request, *args, **kwargs):
        serializer = ClassifyUploadSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        model_record = data.get("model") or default_model_for(request.user)
        if data.get("file") is not None:
            upload = read_single_image(data["file"])
        else:
            try:
                name, body = fetch_url(data["url"], user_id=request.user.pk)
            except UrlRefused as exc:
                raise UrlRefusedError(str(exc), details={"url": data["url"][:2000]}) from exc
            upload = UploadedImage(name, body)
        try:
            prediction = classify_image(request.user, upload, model_record, data.get("normalization"))
        except ImageRejected as exc:
            raise ImageRejectedError(str(exc), details={"file": upload.name}) from exc
        context = {**self.get_serializer_context(), "threshold": data.get("threshold")}
        body = PredictionSerializer(prediction, context=context).data
        return Response(body, status=status.HTTP_201_CREATED, headers={"Location": body["url"]})

    @extend_schema(
        summary="The saliency map of a prediction (WebP; maps stored before WebP stay PNG)",
        parameters=[SaliencyQuerySerializer],
        responses={
            (200, "image/webp"): OpenApiResponse(OpenApiTypes.BINARY, description="the overlay, made on first request"),
            (200, "image/png"): OpenApiResponse(OpenApiTypes.BINARY, description="an overlay stored before WebP"),
            503: error_response("The model cannot be loaded right now."),
        },
        tags=["predictions"],
    )
    @action(detail=True, methods=["get"], renderer_classes=[WebPRenderer, PNGRenderer, JSONRenderer])
    def saliency(self, request, uid=None):
        prediction = self.get_object()
        method = validated_query(SaliencyQuerySerializer, request)["method"]
        field = ensure_saliency(prediction, method)  # ModelUnavailable -> 503 (api_support)
        response = FileResponse(field.open("rb"), content_type=saliency_content_type(field))
        response["Cache-Control"] = "private, max-age=86400"
        return response


# --- the caller and their tokens -------------------------------------------------------------------------------


class MeView(APIView):
    permission_classes = [IsLabMember]
    throttle_classes = [ApiRateThrottle]

    @extend_schema(summary="Who the token belongs to, the defaults and the limits", responses=MeSerializer, tags=["me"])
    def get(self, request):
        user = request.user
        # the model a request without model= gets: the lab's default, not the user's web dropdown choice
        default = default_model_for(user) if usable_models(user).exists() else None
        body = {
            "username": user.get_username(),
            "laboratory": str(user.laboratory) if user.laboratory_id else None,
            "review_threshold": user.review_threshold,
            "default_model": model_ref(default) if default is not None else None,
            "can_classify": user.has_perm("classifier.add_prediction"),
            "authenticated_by": "token" if isinstance(request.auth, ApiToken) else "session",
            "limits": limits_payload(),
        }
        return Response(body)


__all__ = [
    "ClassifierModelViewSet",
    "MeView",
    "PredictionViewSet",
]
