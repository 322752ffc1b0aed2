from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.template.response import TemplateResponse

from .models import ApiToken, CellCategory, Laboratory, LabSettings, User
from .scoping import scoped


class LabScopedAdmin(admin.ModelAdmin):
    """Staff who are not superusers see only their own laboratory's rows."""

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        return queryset if request.user.is_superuser else scoped(queryset, request.user)


@admin.register(Laboratory)
class LaboratoryAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    search_fields = ["name"]


@admin.register(User)
class UserAdmin(LabScopedAdmin, BaseUserAdmin):
    list_display = ["username", "email", "laboratory", "is_staff", "is_active"]
    list_filter = ["laboratory", "groups", "is_staff", "is_active"]
    fieldsets = (*BaseUserAdmin.fieldsets, ("Laboratory", {"fields": ("laboratory", "review_threshold")}))
    add_fieldsets = (*BaseUserAdmin.add_fieldsets, ("Laboratory", {"fields": ("laboratory",)}))


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """API tokens: the key is shown once, on the page after "Save"; only its prefix and HMAC are stored."""

    list_display = ["name", "user", "shown_prefix", "created_at", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "user__laboratory"]
    search_fields = ["name", "prefix", "user__username"]
    readonly_fields = ["shown_prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def get_queryset(self, request):
        queryset = super().get_queryset(request).select_related("user", "user__laboratory")
        if request.user.is_superuser:
            return queryset
        return (
            queryset.filter(user__laboratory_id=request.user.laboratory_id)
            if request.user.laboratory_id
            else queryset.none()
        )

    def get_fields(self, request, obj=None):
        return ["user", "name"] if obj is None else ["user", "name", *self.readonly_fields]

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is None else ["user", *self.readonly_fields]

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "user" and not request.user.is_superuser:
            kwargs["queryset"] = scoped(User.objects.all(), request.user)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    @admin.display(description="key starts")
    def shown_prefix(self, obj):
        return obj.shown_prefix

    def save_model(self, request, obj, form, change):
        if not change:
            request._new_api_key = obj.assign_new_key()  # shown by response_add, never stored
        obj._history_user = request.user  # the audit trail names the administrator, not the token's owner
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj, post_url_continue=None):
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "token": obj,
            "key": request._new_api_key,
            "title": "API token created",
        }
        response = TemplateResponse(request, "admin/accounts/apitoken/created.html", context)
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        tokens = list(queryset.filter(revoked_at__isnull=True))
        for token in tokens:  # one by one: each revocation is an audit row with the administrator's name
            token.revoke(by=request.user)
        self.message_user(request, f"{len(tokens)} token(s) revoked.")


class AuditedAdminMixin:
    """Saves from the admin name the administrator in the audit trail (django-simple-history)."""

    def save_model(self, request, obj, form, change):
        obj._history_user = request.user
        obj._change_reason = "changed in the admin" if change else "added in the admin"
        super().save_model(request, obj, form, change)

    def delete_model(self, request, obj):
        obj._history_user = request.user
        obj._change_reason = "deleted in the admin"
        super().delete_model(request, obj)


@admin.register(LabSettings)
class LabSettingsAdmin(AuditedAdminMixin, LabScopedAdmin):
    list_display = ["laboratory", "count_target", "two_person_signoff", "require_all_verified", "out_of_scope_limit"]
    readonly_fields = ["updated_at"]


@admin.register(CellCategory)
class CellCategoryAdmin(AuditedAdminMixin, LabScopedAdmin):
    list_display = ["label", "key", "hotkey", "is_active", "position", "laboratory"]
    list_filter = ["laboratory", "is_active"]
    search_fields = ["key", "label"]
