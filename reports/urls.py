from django.urls import path

from . import views

app_name = "reports"
urlpatterns = [
    path("", views.batch_list, name="batches"),
    path("new/", views.batch_new, name="batch_new"),
    path("<uuid:uid>/", views.batch_report, name="batch"),
    path("<uuid:uid>/status.json", views.batch_status, name="batch_status"),
    path("<uuid:uid>/report.csv", views.batch_csv, name="batch_csv"),
    path("<uuid:uid>/summary.csv", views.batch_summary_csv, name="batch_summary_csv"),
    # evaluation runs (true labels for a finished batch) and re-running a batch with another model
    path("<uuid:uid>/evaluate/", views.evaluate_batch, name="evaluate"),
    path("<uuid:uid>/rerun/", views.rerun, name="rerun"),
    path("evaluations/", views.evaluation_list, name="evaluations"),
    path("evaluations/compare/", views.evaluation_compare, name="evaluation_compare"),
    path("evaluations/<uuid:uid>/", views.evaluation_detail, name="evaluation"),
    path("evaluations/<uuid:uid>/metrics.csv", views.evaluation_csv, name="evaluation_csv"),
    path("evaluations/<uuid:uid>/metrics.json", views.evaluation_json, name="evaluation_json"),
    path("evaluations/<uuid:uid>/<slug:kind>.png", views.evaluation_figure, name="evaluation_figure"),
]
