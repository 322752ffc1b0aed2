"""/api/v1/tokens/: the API behind the tokens page (browser session only)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.authentication import SessionAuthentication
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.response import Response

from wbcsite.api_errors import ApiError

from .authentication import ApiRateThrottle
from .models import ApiToken, TooManyTokens
from .serializers import ApiTokenSerializer, NewApiTokenSerializer


@extend_schema_view(
    list=extend_schema(summary="Your API tokens (browser session only)", tags=["tokens"]),
    create=extend_schema(
        summary="Create an API token; the key is in this response only (browser session only)",
        responses={201: NewApiTokenSerializer},
        tags=["tokens"],
    ),
    destroy=extend_schema(summary="Revoke an API token (browser session only)", responses={204: None}, tags=["tokens"]),
)
class ApiTokenViewSet(
    mixins.ListModelMixin, mixins.CreateModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    """The API behind the tokens page. Session authentication only: a token cannot mint or revoke tokens."""

    authentication_classes = [SessionAuthentication]
    permission_classes = []  # any logged-in user manages their own tokens (checked in initial)
    throttle_classes = [ApiRateThrottle]
    serializer_class = ApiTokenSerializer
    queryset = ApiToken.objects.none()  # the real one is get_queryset(); this types the path parameter
    lookup_value_regex = "[0-9]+"

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        if not request.user.is_authenticated:
            raise PermissionDenied("Manage API tokens from a logged-in browser session (/account/tokens/).")

    def get_queryset(self):
        return ApiToken.objects.filter(user=self.request.user).order_by("-created_at", "-id")

    def get_object(self):
        try:
            return self.get_queryset().get(pk=int(self.kwargs["pk"]))
        except (ValueError, ApiToken.DoesNotExist):
            raise NotFound("No API token found.") from None

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            token, key = ApiToken.issue_within_limit(request.user, serializer.validated_data["name"])
        except TooManyTokens as exc:
            raise ApiError(str(exc), code="too_many_tokens") from exc
        body = NewApiTokenSerializer(token, context={**self.get_serializer_context(), "key": key}).data
        return Response(body, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})

    def perform_destroy(self, instance: ApiToken) -> None:
        instance.revoke()
