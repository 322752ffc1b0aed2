"""Filters and tags for the evaluation pages (the shared ones, ``percent`` and ``css_percent``, live in ``wbc``)."""

from __future__ import annotations

from django import template

from accounts.scoping import scoped
from classifier.models import ClassifierModel

register = template.Library()


@register.filter
def review_reason(prediction) -> str:
    """Why the cell would be flagged, in words (the outlier detector, else low confidence); the page's slider
    decides whether the flag shows."""
    return prediction.flag_reason(float("inf"))


@register.filter
def get_item(mapping, key):
    """``{{ dict|get_item:key }}``; None when the key (or the mapping) is missing."""
    try:
        return mapping.get(key)
    except AttributeError:
        return None


@register.filter
def metric(value, digits: int = 3) -> str:
    """0.66666 -> '0.667'; None (undefined, e.g. kappa of a one-class subset) -> '—'."""
    try:
        return f"{float(value):.{int(digits)}f}"
    except (TypeError, ValueError):
        return "—"


@register.filter
def signed(value, digits: int = 3) -> str:
    """A difference with its sign: '+0.120', '−0.050', '±0.000'; '—' when undefined."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "—"
    text = f"{abs(number):.{int(digits)}f}"
    if float(text) == 0:
        return "±" + text
    return ("+" if number > 0 else "−") + text


@register.simple_tag(takes_context=True)
def rerun_models(context, batch):
    """The models the current user may re-run ``batch`` with (usable, in scope, not the batch's own)."""
    request = context.get("request")
    if request is None:
        return ClassifierModel.objects.none()
    return scoped(ClassifierModel.objects.usable(), request.user).exclude(pk=batch.model_id)


@register.simple_tag(takes_context=True)
def evaluation_runs_for(context, batch, limit: int = 10):
    """The current user's lab's evaluation runs of ``batch``, newest first."""
    from reports.models import EvaluationRun

    request = context.get("request")
    if request is None:
        return EvaluationRun.objects.none()
    runs = scoped(EvaluationRun.objects.select_related("model", "user"), request.user).filter(batch=batch)
    return runs.order_by("-created_at", "-id")[: int(limit)]
