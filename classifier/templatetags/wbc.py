from django import template

register = template.Library()


@register.filter
def percent(value, digits: int = 1) -> str:
    """0.8734 -> '87.3%'."""
    try:
        return f"{float(value) * 100:.{int(digits)}f}%"
    except (TypeError, ValueError):
        return "—"


@register.filter
def css_percent(value) -> str:
    """0.8734 -> '87.34' for inline widths (always a dot decimal, whatever the locale)."""
    try:
        return f"{max(0.0, min(1.0, float(value))) * 100:.2f}"
    except (TypeError, ValueError):
        return "0"


@register.filter
def milliseconds(value) -> str:
    try:
        return f"{float(value):.0f} ms"
    except (TypeError, ValueError):
        return "—"


@register.filter
def needs_review(prediction, threshold) -> bool:
    return prediction.needs_review(float(threshold))
