from django.contrib import admin

from accounts.admin import LabScopedAdmin

from .models import EvaluationRun


@admin.register(EvaluationRun)
class EvaluationRunAdmin(LabScopedAdmin):
    """Read-only: runs are created from the batch page, and their metrics are a record."""

    list_display = [
        "batch",
        "model",
        "model_version",
        "threshold",
        "n_labelled",
        "labels_filename",
        "user",
        "created_at",
    ]
    list_filter = ["laboratory", "model"]
    search_fields = ["uid", "batch__name", "labels_filename", "labels_sha256"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in EvaluationRun._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
