"""Pieces every /api/v1/ viewset shares: permissions and throttles per action, renderers, query validation, and
how an error response is documented in the schema (the error shape itself is :mod:`wbcsite.api_errors`)."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse
from rest_framework.renderers import BaseRenderer

from accounts.authentication import ApiRateThrottle, CanClassify, IsLabMember, SubmitRateThrottle

UUID_PATTERN = "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
MB = 1024 * 1024


def error_response(description: str) -> OpenApiResponse:
    """An error response in the schema (the shape is the Error component; see wbcsite.api_errors)."""
    return OpenApiResponse(response={"$ref": "#/components/schemas/Error"}, description=description)


def validated_query(serializer_class, request) -> dict:
    """Validated query parameters. A plain dict, so an empty value (``?threshold=``) is invalid, not omitted."""
    serializer = serializer_class(data=request.query_params.dict())
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class CSVRenderer(BaseRenderer):
    """Lets ``Accept: text/csv`` through content negotiation; the views return the CSV bytes themselves."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return data


class PNGRenderer(BaseRenderer):
    media_type = "image/png"
    format = "png"
    charset = None
    render_style = "binary"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return data


class WebPRenderer(PNGRenderer):
    """Saliency overlays are WebP (older stored ones PNG): a client that accepts only image/webp is served too."""

    media_type = "image/webp"
    format = "webp"


class LabApiMixin:
    """Permissions and throttles shared by the viewsets: classify/submit actions need more than reading."""

    submit_actions: frozenset[str] = frozenset()

    def get_permissions(self):
        permissions = [IsLabMember()]
        if self.action in self.submit_actions:
            permissions.append(CanClassify())
        return permissions

    def get_throttles(self):
        throttles = [ApiRateThrottle()]
        if self.action in self.submit_actions:
            throttles.append(SubmitRateThrottle())
        return throttles
