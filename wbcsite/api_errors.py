"""What every API endpoint shares: the error shape, the exception handler, pagination and the schema hook.

Every error is JSON of one shape, whatever raised it (a serializer, DRF's authentication or throttling, a
``get_scoped_or_404``, a refused upload, a model that cannot be loaded)::

    {"error": {"code": "image_rejected", "message": "cell.png: the file is empty.", "details": {...}}}

``code`` is stable (clients branch on it), ``message`` is one sentence for a person, ``details`` is structured
(per-field or per-file reasons, ``retry_after_seconds``) or null.
"""

from __future__ import annotations

import logging
import math

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import set_rollback

from wbc_ml.inference import ModelUnavailable

logger = logging.getLogger(__name__)


class ApiError(exceptions.APIException):
    """An API error with a stable ``code`` and optional structured ``details``."""

    status_code = status.HTTP_400_BAD_REQUEST
    error_code = "bad_request"

    def __init__(self, message: str, *, details=None, status_code: int | None = None, code: str | None = None):
        super().__init__(message)
        self.details = details
        if status_code is not None:
            self.status_code = status_code
        if code is not None:
            self.error_code = code


class ImageRejectedError(ApiError):
    error_code = "image_rejected"


class UrlRefusedError(ApiError):
    error_code = "url_refused"


class UnsupportedImageType(ApiError):
    status_code = status.HTTP_415_UNSUPPORTED_MEDIA_TYPE
    error_code = "unsupported_media_type"


class PayloadTooLarge(ApiError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    error_code = "too_large"


class Conflict(ApiError):
    status_code = status.HTTP_409_CONFLICT
    error_code = "conflict"


class ServiceUnavailable(ApiError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    error_code = "model_unavailable"


# DRF's own exceptions: their default codes, renamed where a clearer one helps clients.
DRF_CODES = {
    exceptions.ValidationError: "invalid",
    exceptions.ParseError: "malformed_request",
    exceptions.NotAuthenticated: "not_authenticated",
    exceptions.AuthenticationFailed: "authentication_failed",
    exceptions.PermissionDenied: "permission_denied",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "throttled",
}


def _plain(detail):
    """ErrorDetail trees as plain JSON (str, list, dict)."""
    if isinstance(detail, dict):
        return {str(key): _plain(value) for key, value in detail.items()}
    if isinstance(detail, list | tuple):
        return [_plain(value) for value in detail]
    return str(detail)


def _first_messages(detail, prefix: str = "") -> list[str]:
    """'field: message' for the first message of each field (nested fields joined with dots)."""
    if isinstance(detail, dict):
        out = []
        for key, value in detail.items():
            label = "" if key == "non_field_errors" else f"{prefix}{key}"
            out.extend(_first_messages(value, f"{label}." if label else ""))
        return out
    if isinstance(detail, list):
        for value in detail:
            found = _first_messages(value, prefix)
            if found:
                return found[:1]
        return []
    return [f"{prefix.rstrip('.')}: {detail}" if prefix else str(detail)]


def _convert(exc: Exception) -> exceptions.APIException | None:
    """Django's and our domain exceptions as API exceptions; None for a genuine server error."""
    if isinstance(exc, exceptions.APIException):
        return exc
    if isinstance(exc, Http404):
        return exceptions.NotFound(str(exc) or "Not found.")
    if isinstance(exc, DjangoPermissionDenied):
        return exceptions.PermissionDenied(str(exc) or None)
    if isinstance(exc, TooManyFilesSent):
        return PayloadTooLarge(
            f"Too many files in one request: at most {settings.DATA_UPLOAD_MAX_NUMBER_FILES}.", code="too_many_files"
        )
    if isinstance(exc, TooManyFieldsSent):
        return PayloadTooLarge("Too many form fields in one request.", code="too_many_fields")
    if isinstance(exc, RequestDataTooBig):
        return PayloadTooLarge(
            "The request body is too large; send images as multipart file uploads.", code="request_too_large"
        )
    if isinstance(exc, ModelUnavailable):
        return ServiceUnavailable(f"The model cannot be used right now: {exc}")
    return None


def error_body(code: str, message: str, details=None) -> dict:
    return {"error": {"code": code, "message": message, "details": details}}


def api_exception_handler(exc: Exception, context: dict) -> Response | None:
    request = context.get("request")
    converted = _convert(exc)
    if converted is None:
        if settings.DEBUG:
            return None  # Django's debug page
        logger.exception("unhandled error in the API", exc_info=exc)
        converted = ApiError(
            "Something went wrong on our side; the request was not completed.",
            status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
            code="server_error",
        )
    headers = {}
    if getattr(converted, "auth_header", None):
        headers["WWW-Authenticate"] = converted.auth_header
    details = getattr(converted, "details", None)
    if isinstance(converted, ApiError):
        code, message = converted.error_code, str(converted.detail)
    else:
        code = next((name for cls, name in DRF_CODES.items() if isinstance(converted, cls)), None)
        code = code or (converted.get_codes() if isinstance(converted.get_codes(), str) else "error")
        if isinstance(converted.detail, dict | list):
            details = _plain(converted.detail)
            found = _first_messages(converted.detail)
            message = "Invalid input: " + "; ".join(found) if found else "Invalid input."
        else:
            message = str(converted.detail)
    if isinstance(converted, exceptions.Throttled) and converted.wait is not None:
        wait = max(1, math.ceil(converted.wait))
        headers["Retry-After"] = str(wait)
        message = f"Too many requests: try again in {wait} second{'s' if wait != 1 else ''}."
        details = {"retry_after_seconds": wait}
    set_rollback()
    if request is not None:  # errors are JSON even where the endpoint renders CSV or PNG
        request.accepted_renderer = JSONRenderer()
        request.accepted_media_type = JSONRenderer.media_type
    return Response(error_body(code, message, details), status=converted.status_code, headers=headers)


class PagePagination(PageNumberPagination):
    """``?page=N`` (and ``?page_size=`` up to 100); the response carries count, next, previous and results."""

    page_size_query_param = "page_size"
    max_page_size = 100

    def get_page_size(self, request) -> int:
        """DRF's page size, except that a page_size that is not one whole number from 1 is a 400, not ignored."""
        values = request.query_params.getlist(self.page_size_query_param)
        if values and (len(values) > 1 or not values[0].isdigit() or int(values[0]) < 1):
            raise exceptions.ValidationError({"page_size": [f"Give one whole number from 1 to {self.max_page_size}."]})
        return super().get_page_size(request)


# --- OpenAPI: the error responses every operation can give -----------------------------------------------------

ERROR_SCHEMA = {
    "type": "object",
    "description": "Every error response has this shape.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "stable, machine-readable", "example": "not_found"},
                "message": {"type": "string", "description": "one sentence for a person"},
                "details": {
                    "description": "per-field or per-file reasons, retry_after_seconds, … (or null)",
                    "nullable": True,
                },
            },
            "required": ["code", "message", "details"],
        }
    },
    "required": ["error"],
}
COMMON_ERRORS = {
    "400": "Bad input; details name each field (or file) and its problem.",
    "401": "No token, a malformed or unknown token, or a revoked one.",
    "403": "Not allowed: no laboratory, a missing permission, or a session request without its CSRF token.",
    "404": "Not found (another laboratory's objects are not found either).",
    "429": "Too many requests; the Retry-After header says how many seconds to wait.",
}


def document_error_responses(result, generator, request, public):
    """drf-spectacular post-processing hook: the Error component and the common error responses."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/Error"}
    for path_item in result.get("paths", {}).values():
        for method, operation in path_item.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            responses = operation.setdefault("responses", {})
            for code, description in COMMON_ERRORS.items():
                responses.setdefault(
                    code, {"description": description, "content": {"application/json": {"schema": ref}}}
                )
            if method == "post":
                responses.setdefault(
                    "413",
                    {
                        "description": "The request is larger than the limits (body, files, images).",
                        "content": {"application/json": {"schema": ref}},
                    },
                )
            if method == "get" and "406" not in responses:
                responses["406"] = {
                    "description": "The Accept header asks for a type this endpoint does not produce.",
                    "content": {"application/json": {"schema": ref}},
                }
    return result
