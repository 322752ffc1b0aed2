from django.contrib import admin, messages
from django.shortcuts import redirect

from accounts.admin import LabScopedAdmin

from .models import ClassifierModel, Prediction


@admin.register(ClassifierModel)
class ClassifierModelAdmin(LabScopedAdmin):
    list_display = [
        "name",
        "version",
        "architecture",
        "input_height",
        "test_accuracy",
        "is_active",
        "is_bundled",
        "laboratory",
    ]
    list_filter = ["is_active", "is_bundled", "architecture", "laboratory"]
    search_fields = ["name", "architecture", "sha256"]
    # The files served and their checksums are set by registration only (register_models, the upload page).
    readonly_fields = [
        "file_name",
        "sha256",
        "onnx_file_name",
        "onnx_sha256",
        "onnx_status",
        "ood_file_name",
        "ood_sha256",
        "card",
        "created_at",
        "is_bundled",
        "uploaded_by",
    ]
    actions = ["activate", "deactivate"]

    def add_view(self, request, form_url="", extra_context=None):
        """New models come in through the validated upload page (checks run before anything is stored)."""
        return redirect("classifier:model_upload")

    @staticmethod
    def _switch(request, queryset, active: bool) -> int:
        """One save per model (not a queryset update), so each switch is an audit row with the admin's name."""
        records = list(queryset.exclude(is_active=active))
        for record in records:
            record.is_active = active
            record._history_user = request.user
            record._change_reason = "model activated" if active else "model deactivated"
            record.save(update_fields=["is_active"])
        return len(records)

    def _own_rows(self, request, queryset):
        """The selection without the shared models, which only a superuser may switch (they serve every lab)."""
        if request.user.is_superuser:
            return queryset
        shared = queryset.filter(laboratory__isnull=True).count()
        if shared:
            self.message_user(
                request, f"{shared} shared model(s) left as they are: only a superuser manages them.", messages.WARNING
            )
        return queryset.filter(laboratory_id=request.user.laboratory_id)

    @admin.action(description="Activate selected models")
    def activate(self, request, queryset):
        switched = self._switch(request, self._own_rows(request, queryset), True)
        self.message_user(request, f"{switched} model(s) activated.")

    @admin.action(description="Deactivate selected models")
    def deactivate(self, request, queryset):
        switched = self._switch(request, self._own_rows(request, queryset), False)
        self.message_user(request, f"{switched} model(s) deactivated.")


@admin.register(Prediction)
class PredictionAdmin(LabScopedAdmin):
    list_display = [
        "original_filename",
        "predicted_class",
        "confidence",
        "is_outlier",
        "model",
        "user",
        "laboratory",
        "created_at",
    ]
    list_filter = ["laboratory", "predicted_class", "model", "is_outlier"]
    search_fields = ["original_filename", "uid"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
