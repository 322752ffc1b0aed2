"""Values every page may need, from their one definition."""

from __future__ import annotations

from django.http import HttpRequest

from accounts.roles import can_manage_lab
from adaptation.services import may_manage as may_adapt_models
from wbc_ml.review_flag import DEFAULT_THRESHOLD, THRESHOLD_MAX, THRESHOLD_MIN


def review_threshold(request: HttpRequest) -> dict:
    """The review threshold's bounds and default, for sliders and help texts."""
    return {"threshold_min": THRESHOLD_MIN, "threshold_max": THRESHOLD_MAX, "default_threshold": DEFAULT_THRESHOLD}


def navigation(request: HttpRequest) -> dict:
    """What the top bar offers the signed-in user."""
    user = getattr(request, "user", None)
    signed_in = bool(user and user.is_authenticated)
    return {
        "can_manage_lab": signed_in and can_manage_lab(user),
        "can_adapt_models": signed_in and may_adapt_models(user),
    }
