from django.contrib import admin
from django.utils import timezone

from accounts.admin import LabAdminMixin, LabScopedAdmin
from accounts.scoping import scoped

from .models import CellVerification, EvaluationRun, ReportVersion
from .review import slide_state


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


class SlideScopedAdmin(LabAdminMixin, admin.ModelAdmin):
    """Rows that belong to a slide: staff who are not superusers see only their own laboratory's slides (another
    lab's row is a 404)."""

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        return queryset if request.user.is_superuser else scoped(queryset, request.user)

    def has_add_permission(self, request):
        return False  # made by the review page, where the slide's rules apply


@admin.register(CellVerification)
class CellVerificationAdmin(SlideScopedAdmin):
    """A technologist's class for a cell. Read-only once the slide is signed (amend the report instead)."""

    list_display = ["item", "verified_class", "verified_by", "verified_at"]
    list_select_related = ["item", "verified_by"]
    search_fields = ["item__original_filename", "item__batch__name", "item__batch__external_id"]
    readonly_fields = ["item", "verified_by", "verified_at"]

    def _locked(self, obj) -> bool:
        return obj is not None and slide_state(obj.item.batch).locked

    def has_change_permission(self, request, obj=None):
        return super().has_change_permission(request, obj) and not self._locked(obj)

    def has_delete_permission(self, request, obj=None):
        return super().has_delete_permission(request, obj) and not self._locked(obj)

    def save_model(self, request, obj, form, change):
        obj.verified_by, obj.verified_at = request.user, timezone.now()
        obj._history_user, obj._change_reason = request.user, "changed in the admin"
        super().save_model(request, obj, form, change)

    def delete_model(self, request, obj):
        obj._history_user, obj._change_reason = request.user, "deleted in the admin"
        super().delete_model(request, obj)


@admin.register(ReportVersion)
class ReportVersionAdmin(SlideScopedAdmin):
    """Report versions are signed on the review page (password typed again); the admin only shows them."""

    list_display = ["batch", "number", "signed_by", "signed_at", "countersigned_by", "countersigned_at"]
    list_select_related = ["batch", "signed_by", "countersigned_by"]
    search_fields = ["batch__name", "batch__external_id"]
    readonly_fields = [f.name for f in ReportVersion._meta.fields]

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
