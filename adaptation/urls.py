from django.urls import path

from . import views

app_name = "adaptation"
urlpatterns = [
    path("", views.adaptation_page, name="page"),
    path("<int:pk>/", views.job_detail, name="job"),
    path("<int:pk>/status/", views.job_status, name="job_status"),
    path("<int:pk>/card.json", views.job_card, name="job_card"),
    path("<int:pk>/cancel/", views.job_cancel, name="job_cancel"),
    path("<int:pk>/promote/", views.job_promote, name="job_promote"),
    path("<int:pk>/discard/", views.job_discard, name="job_discard"),
]
