from django.urls import path

from . import views

app_name = "reports"
urlpatterns = [
    path("", views.batch_list, name="batches"),
    path("<uuid:uid>/", views.batch_report, name="batch"),
    path("<uuid:uid>/status.json", views.batch_status, name="batch_status"),
    path("<uuid:uid>/report.csv", views.batch_csv, name="batch_csv"),
    path("<uuid:uid>/summary.csv", views.batch_summary_csv, name="batch_summary_csv"),
]
