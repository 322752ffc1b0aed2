from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("wbcsite.api_urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("batches/", include("reports.urls")),
    path("", include("accounts.urls")),
    path("", include("classifier.urls")),
]
