"""/api/v1/: the LIS API (one router), its OpenAPI schema, and the Swagger UI and Redoc pages."""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.urls import path, re_path
from django.views.decorators.csp import csp_override
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerSplitView
from rest_framework.exceptions import NotFound
from rest_framework.routers import DefaultRouter
from rest_framework.views import APIView

from accounts import api as accounts_api
from accounts.authentication import ApiRateThrottle, IsLabMember
from classifier import api
from lis import api as lis_api
from reports import api as reports_api


class Router(DefaultRouter):
    include_format_suffixes = False  # one URL per resource; the type is negotiated (Accept)


class NotFoundView(APIView):
    """Any other path under /api/v1/: a JSON 404 (after authentication, like every endpoint)."""

    permission_classes = [IsLabMember]
    throttle_classes = [ApiRateThrottle]
    schema = None

    def dispatch_not_found(self, request, *args, **kwargs):
        hint = "" if request.path.endswith("/") else f" (API paths end with a slash: {request.path}/)"
        raise NotFound(f"There is no such API endpoint{hint}; see /api/v1/docs/ for the list.")

    get = post = put = patch = delete = head = options = dispatch_not_found


router = Router()
router.register("models", api.ClassifierModelViewSet, basename="model")
router.register("predictions", api.PredictionViewSet, basename="prediction")
router.register("batches", reports_api.BatchViewSet, basename="batch")
router.register("batches", lis_api.LisBatchViewSet, basename="batch-lis")
router.register("evaluations", reports_api.EvaluationRunViewSet, basename="evaluation")
router.register("tokens", accounts_api.ApiTokenViewSet, basename="token")

app_name = "api"
urlpatterns = [
    path("me/", api.MeView.as_view(), name="me"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    # The documentation pages are for people: a browser without a session is sent to log in. Swagger UI's start-up
    # script is a separate request (no inline script); Redoc injects <style> elements, so its page allows them.
    path("docs/", login_required(SpectacularSwaggerSplitView.as_view(url_name="api:schema")), name="docs"),
    path(
        "redoc/",
        login_required(csp_override(settings.WBC_REDOC_CSP)(SpectacularRedocView.as_view(url_name="api:schema"))),
        name="redoc",
    ),
    *router.urls,
    re_path(r"^.*$", NotFoundView.as_view(), name="not-found"),
]
