from django.contrib import admin

from accounts.admin import LabScopedAdmin, ReadOnlyAdminMixin

from .models import AdaptationJob


@admin.register(AdaptationJob)
class AdaptationJobAdmin(ReadOnlyAdminMixin, LabScopedAdmin):
    """Read-only: jobs are started, cancelled, promoted and discarded on the adaptation page (audited there)."""

    list_display = ["base_model", "status", "started_by", "created_at", "result_model", "laboratory"]
    list_filter = ["status", "laboratory"]
    date_hierarchy = "created_at"
