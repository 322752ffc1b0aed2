from django.contrib import admin
from django.contrib.auth.decorators import login_not_required
from django.templatetags.static import static
from django.urls import include, path
from django.utils.functional import lazy
from django.views.generic import RedirectView

from wbcsite import health, metrics

urlpatterns = [
    # Browsers ask for /favicon.ico on pages without an icon link (the admin, the API's JSON): send them the file.
    path("favicon.ico", login_not_required(RedirectView.as_view(url=lazy(static, str)("favicon.ico"), permanent=True))),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics, name="metrics"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("wbcsite.api_urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("batches/", include("reports.urls")),
    path("lis/", include("lis.urls")),
    path("", include("accounts.urls")),
    path("", include("classifier.urls")),
]
