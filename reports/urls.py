from django.urls import path

from . import review_page, review_views, views

app_name = "reports"
urlpatterns = [
    path("", views.batch_list, name="batches"),
    path("new/", views.batch_new, name="batch_new"),
    path("<uuid:uid>/", views.batch_report, name="batch"),
    path("<uuid:uid>/status.json", views.batch_status, name="batch_status"),
    path("<uuid:uid>/report.csv", views.batch_csv, name="batch_csv"),
    path("<uuid:uid>/summary.csv", views.batch_summary_csv, name="batch_summary_csv"),
    # review and sign-off (JSON for the review page; forms for signing), the printable report, the audit trail
    path("<uuid:uid>/review/", review_page.review_page, name="review"),
    path("<uuid:uid>/review/state.json", review_views.review_state, name="review_state"),
    path("<uuid:uid>/review/classify.json", review_views.review_classify, name="review_classify"),
    path("<uuid:uid>/review/sign/", review_views.review_sign, name="review_sign"),
    path("<uuid:uid>/review/countersign/", review_views.review_countersign, name="review_countersign"),
    path("<uuid:uid>/review/amend/", review_views.review_amend, name="review_amend"),
    path("<uuid:uid>/cells/<int:item_id>/thumb", review_views.cell_thumb, name="cell_thumb"),
    path("<uuid:uid>/wbc-count/", review_views.wbc_count, name="wbc_count"),
    path("<uuid:uid>/report/print/", review_views.report_print, name="report_print"),
    path("<uuid:uid>/history/", review_views.slide_history, name="slide_history"),
    path("<uuid:uid>/history.csv", review_views.slide_history_csv, name="slide_history_csv"),
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
