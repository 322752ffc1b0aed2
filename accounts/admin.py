"""The admin, lab by lab: staff who are not superusers work inside their own laboratory only.

For them another lab's row is a 404 (change, delete, history and password pages) and absent from every changelist,
filter and choice list; rows shared by every lab (laboratory empty: the bundled models) are read-only; the
laboratory of a row is never theirs to change (new rows join their lab); and users are their lab's members
without the superusers, who can be neither seen, nor made, nor given a token.
"""

from django.contrib import admin
from django.contrib.admin.utils import get_fields_from_path
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.db.models import QuerySet
from django.http import Http404
from django.template.response import TemplateResponse

from .models import ApiToken, CellCategory, Laboratory, LabSettings, User
from .scoping import scoped

LAB_FILTERS = frozenset({"laboratory", "user__laboratory"})


def manageable_users(user) -> QuerySet:
    """The users ``user`` may see and manage in the admin: their lab's members (through accounts.scoping),
    never a superuser and never a user without a lab; everyone for a superuser."""
    if user.is_superuser:
        return User.objects.all()
    return scoped(User, user).filter(laboratory_id=user.laboratory_id, is_superuser=False)


def lab_choices(model, user) -> QuerySet:
    """What a foreign key to ``model`` may offer ``user`` in an admin form."""
    if user.is_superuser:
        return model._default_manager.all()
    if model is Laboratory:
        return Laboratory.objects.filter(pk=user.laboratory_id)
    if model is User:
        return manageable_users(user)
    if any(field.name == "laboratory" for field in model._meta.get_fields()):
        return scoped(model, user)
    return model._default_manager.all()


class LabAdminMixin:
    """Outside the caller's scope a row is a 404 (not Django's redirect), and no filter or choice list shows
    another lab's rows or names."""

    def get_object(self, request, object_id, from_field=None):
        obj = super().get_object(request, object_id, from_field)
        if obj is None:
            raise Http404(f"No {self.opts.verbose_name} found.")
        return obj

    def get_list_filter(self, request):
        filters = list(super().get_list_filter(request))
        if request.user.is_superuser:
            return filters
        return [self._related_only(f) for f in filters if f not in LAB_FILTERS]

    def _related_only(self, list_filter):
        """A related filter lists only what the (scoped) changelist refers to, not every row of another lab."""
        if isinstance(list_filter, str) and get_fields_from_path(self.model, list_filter)[-1].is_relation:
            return (list_filter, admin.RelatedOnlyFieldListFilter)
        return list_filter

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if not request.user.is_superuser:
            kwargs["queryset"] = lab_choices(db_field.related_model, request.user)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)


class ReadOnlyAdminMixin:
    """Rows the admin only shows: they are made and changed elsewhere (audited there), never here."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class LabScopedAdmin(LabAdminMixin, admin.ModelAdmin):
    """Staff who are not superusers see only their own laboratory's rows (and the shared ones, read-only)."""

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        return queryset if request.user.is_superuser else scoped(queryset, request.user)

    @staticmethod
    def is_shared(obj) -> bool:
        """A row every lab uses (laboratory empty), such as a bundled model."""
        return obj is not None and getattr(obj, "laboratory_id", 0) is None

    def has_change_permission(self, request, obj=None):
        allowed = super().has_change_permission(request, obj)
        return allowed and (request.user.is_superuser or not self.is_shared(obj))

    def has_delete_permission(self, request, obj=None):
        allowed = super().has_delete_permission(request, obj)
        return allowed and (request.user.is_superuser or not self.is_shared(obj))

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if not request.user.is_superuser and "laboratory" not in fields:
            fields.append("laboratory")
        return fields

    def save_model(self, request, obj, form, change):
        if not change and not request.user.is_superuser and hasattr(obj, "laboratory_id"):
            obj.laboratory_id = request.user.laboratory_id  # a new row joins the admin's own lab
        super().save_model(request, obj, form, change)


@admin.register(Laboratory)
class LaboratoryAdmin(LabAdminMixin, admin.ModelAdmin):
    list_display = ["name", "created_at"]
    search_fields = ["name"]

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        return queryset if request.user.is_superuser else queryset.filter(pk=request.user.laboratory_id)


@admin.register(User)
class UserAdmin(LabScopedAdmin, BaseUserAdmin):
    list_display = ["username", "email", "laboratory", "is_staff", "is_active"]
    list_filter = ["laboratory", "groups", "is_staff", "is_active"]
    fieldsets = (*BaseUserAdmin.fieldsets, ("Laboratory", {"fields": ("laboratory", "review_threshold")}))
    add_fieldsets = (*BaseUserAdmin.add_fieldsets, ("Laboratory", {"fields": ("laboratory",)}))
    superuser_only_fields = ("laboratory", "is_superuser", "user_permissions")

    def get_queryset(self, request):
        return super().get_queryset(request) & manageable_users(request.user)

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if not request.user.is_superuser:
            fields += [f for f in self.superuser_only_fields if f not in fields]
        return fields

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None and not request.user.is_superuser:  # a new user joins the admin's lab (save_model)
            return [(name, options) for name, options in fieldsets if options["fields"] != ("laboratory",)]
        return fieldsets


@admin.register(ApiToken)
class ApiTokenAdmin(LabAdminMixin, admin.ModelAdmin):
    """API tokens: the key is shown once, on the page after "Save"; only its prefix and HMAC are stored."""

    list_display = ["name", "user", "shown_prefix", "created_at", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "user__laboratory"]
    search_fields = ["name", "prefix", "user__username"]
    readonly_fields = ["shown_prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def get_queryset(self, request):
        queryset = super().get_queryset(request).select_related("user", "user__laboratory")
        return queryset if request.user.is_superuser else queryset.filter(user__in=manageable_users(request.user))

    def get_fields(self, request, obj=None):
        return ["user", "name"] if obj is None else ["user", "name", *self.readonly_fields]

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is None else ["user", *self.readonly_fields]

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
