from django.urls import path

from . import views

app_name = "classifier"
urlpatterns = [
    path("", views.classify, name="classify"),
    path("classify/url/", views.classify_url, name="classify_url"),
    path("history/", views.history, name="history"),
    path("models/", views.model_list, name="models"),
    path("models/upload/", views.model_upload, name="model_upload"),
    path("models/<int:pk>/toggle/", views.model_toggle, name="model_toggle"),
    path("models/<int:pk>/lab-default/", views.model_make_lab_default, name="model_lab_default"),
    path("settings/threshold/", views.update_threshold, name="threshold"),
    path("predictions/<uuid:uid>/", views.prediction_detail, name="prediction"),
    path("predictions/<uuid:uid>/image/", views.prediction_image, name="prediction_image"),
    path("predictions/<uuid:uid>/saliency/<str:method>/", views.prediction_saliency, name="saliency"),
]
