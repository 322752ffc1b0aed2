"""Roles are Django groups with fixed permissions, (re)created after every migrate."""

from __future__ import annotations

from django.contrib.auth.models import Group, Permission

TECHNOLOGIST = "Technologist"
SUPERVISOR = "Supervisor"
MODEL_ADMIN = "Model admin"

ROLE_PERMISSIONS: dict[str, list[str]] = {
    # classify, and see the lab's own work
    TECHNOLOGIST: ["classifier.add_prediction", "classifier.view_prediction", "classifier.view_classifiermodel"],
    # a technologist who may also remove results and see the lab's members
    SUPERVISOR: [
        "classifier.add_prediction",
        "classifier.view_prediction",
        "classifier.delete_prediction",
        "classifier.view_classifiermodel",
        "accounts.view_user",
    ],
    # manages the model registry (in the Django admin too)
    MODEL_ADMIN: [
        "classifier.add_prediction",
        "classifier.view_prediction",
        "classifier.view_classifiermodel",
        "classifier.add_classifiermodel",
        "classifier.change_classifiermodel",
        "classifier.delete_classifiermodel",
    ],
}


def ensure_roles(**_kwargs) -> None:
    for role, codes in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=role)
        permissions = []
        for code in codes:
            app_label, codename = code.split(".")
            permission = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
            if permission is not None:
                permissions.append(permission)
        group.permissions.set(permissions)


def can_manage_lab(user) -> bool:
    """Model admins and Supervisors set how their laboratory reviews and signs slides."""
    return bool(getattr(user, "laboratory_id", None)) and (
        user.is_superuser or user.groups.filter(name__in=[MODEL_ADMIN, SUPERVISOR]).exists()
    )
