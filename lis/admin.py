"""LIS admin: destinations (the token is write-only), message settings, and the outbox (read-only, with resend)."""

from __future__ import annotations

from django.contrib import admin, messages

from accounts.admin import LabScopedAdmin
from accounts.models import Laboratory

from .delivery import ResendRefused, resend
from .forms import DestinationForm
from .models import DeliveryAttempt, Destination, LisSettings, OutboxMessage


class DestinationAdminForm(DestinationForm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.laboratory = getattr(self.instance, "laboratory", None) if self.instance.pk else None

    class Meta(DestinationForm.Meta):
        fields = ["laboratory", *DestinationForm.Meta.fields]

    def clean(self):
        self.laboratory = self.cleaned_data.get("laboratory") or self.laboratory
        return super().clean()


@admin.register(Destination)
class DestinationAdmin(LabScopedAdmin):
    form = DestinationAdminForm
    list_display = ["name", "laboratory", "kind", "address", "is_active"]
    list_filter = ["kind", "is_active", "laboratory"]

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "laboratory" and not request.user.is_superuser:
            kwargs["queryset"] = Laboratory.objects.filter(pk=request.user.laboratory_id)  # only their own lab
        return super().formfield_for_foreignkey(db_field, request, **kwargs)


@admin.register(LisSettings)
class LisSettingsAdmin(LabScopedAdmin):
    list_display = ["laboratory", "sending_application", "sending_facility", "send_ai_only"]


class AttemptInline(admin.TabularInline):
    model = DeliveryAttempt
    extra = 0
    can_delete = False
    fields = ["started_at", "finished_at", "outcome", "ack_code", "detail", "worker"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(OutboxMessage)
class OutboxMessageAdmin(LabScopedAdmin):
    list_display = ["control_id", "laboratory", "destination", "batch", "format", "status", "attempts", "last_error"]
    list_filter = ["status", "format", "is_correction", "laboratory"]
    search_fields = ["control_id", "batch__name", "batch__external_id"]
    inlines = [AttemptInline]
    actions = ["resend_messages"]

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.action(description="Resend the selected messages")
    def resend_messages(self, request, queryset):
        for message in queryset.select_related("report_version", "destination"):
            try:
                resend(message)
            except ResendRefused as exc:
                self.message_user(request, f"{message.control_id}: {exc}", messages.WARNING)
        self.message_user(request, "The messages will be sent again.")
