from django.contrib import admin

from accounts.admin import LabScopedAdmin

from .models import AdaptationJob


@admin.register(AdaptationJob)
class AdaptationJobAdmin(LabScopedAdmin):
    """Read-only: jobs are started, cancelled, promoted and discarded on the adaptation page (audited there)."""

    list_display = ["base_model", "status", "started_by", "created_at", "result_model", "laboratory"]
    list_filter = ["status", "laboratory"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
