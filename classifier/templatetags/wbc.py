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


@register.filter
def compact_count(value) -> str:
    """A large count people read at a glance: 2264389 -> '2.26 M', 421317 -> '0.42 M', 8450 -> '8.45 k'."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return "—"
    if abs(number) >= 100_000:
        return f"{number / 1e6:.2f} M"
    if abs(number) >= 1_000:
        return f"{number / 1e3:.2f} k"
    return str(number)


@register.filter
def headline(value) -> str:
    """The first words of a status sentence, before its details: 'ONNX Runtime (max |Δp| …)' -> 'ONNX Runtime'."""
    text = str(value or "")
    return text.split(" (", 1)[0].split(":", 1)[0].strip()
