"""Values every page may need, from their one definition."""

from __future__ import annotations

from django.http import HttpRequest

from wbc_ml.review_flag import DEFAULT_THRESHOLD, THRESHOLD_MAX, THRESHOLD_MIN


def review_threshold(request: HttpRequest) -> dict:
    """The review threshold's bounds and default, for sliders and help texts."""
    return {"threshold_min": THRESHOLD_MIN, "threshold_max": THRESHOLD_MAX, "default_threshold": DEFAULT_THRESHOLD}
