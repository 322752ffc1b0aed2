"""The audit trail in the admin: read-only for everyone (superusers too), narrowed to the staff member's lab."""

from __future__ import annotations

from django.contrib import admin

from accounts.admin import LabAdminMixin

from .models import HISTORICAL_MODELS

LAB_PATHS = {  # how each historical table reaches its laboratory
    "historicalcellverification": "item__batch__laboratory_id",
    "historicalreportversion": "batch__laboratory_id",
    "historicallabsettings": "laboratory_id",
    "historicalcellcategory": "laboratory_id",
    "historicalapitoken": "user__laboratory_id",
    "historicalclassifiermodel": "laboratory_id",
    "historicallaboratory": "id",
}


class AuditAdmin(LabAdminMixin, admin.ModelAdmin):
    list_display = ["history_date", "history_type", "history_user_id", "history_change_reason", "__str__"]
    list_filter = ["history_type"]
    date_hierarchy = "history_date"
    ordering = ["-history_date", "-history_id"]

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        if request.user.is_superuser:
            return queryset
        if request.user.laboratory_id is None:
            return queryset.none()
        lookup = {LAB_PATHS[self.model._meta.model_name]: request.user.laboratory_id}
        if self.model._meta.model_name == "historicalclassifiermodel":  # bundled models belong to every lab
            from django.db.models import Q

            return queryset.filter(Q(**lookup) | Q(laboratory__isnull=True))
        return queryset.filter(**lookup)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


for _model in HISTORICAL_MODELS:
    admin.site.register(_model, AuditAdmin)
