"""The audit trail in the admin: read-only for everyone (superusers too), narrowed to the staff member's lab."""

from __future__ import annotations

from django.contrib import admin

from accounts.admin import LabAdminMixin, ReadOnlyAdminMixin
from accounts.scoping import scoped

from .models import HISTORICAL_MODELS


class AuditAdmin(ReadOnlyAdminMixin, LabAdminMixin, admin.ModelAdmin):
    list_display = ["history_date", "history_type", "history_user_id", "history_change_reason", "__str__"]
    list_filter = ["history_type"]
    date_hierarchy = "history_date"
    ordering = ["-history_date", "-history_id"]

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        return queryset if request.user.is_superuser else scoped(queryset, request.user)


for _model in HISTORICAL_MODELS:
    admin.site.register(_model, AuditAdmin)
