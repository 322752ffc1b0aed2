"""Who may do what with the LIS interface."""

from __future__ import annotations

from accounts.roles import SUPERVISOR


def can_manage_lis(user) -> bool:
    """Destinations, message settings and codes: the lab's Supervisors (and superusers)."""
    return user.is_superuser or user.groups.filter(name=SUPERVISOR).exists()


def can_resend(user) -> bool:
    return user.has_perm("classifier.add_prediction")
