from django.urls import path

from . import views

app_name = "accounts"
urlpatterns = [
    path("account/tokens/", views.tokens, name="tokens"),
    path("settings/lab/", views.lab_settings, name="lab_settings"),
]
