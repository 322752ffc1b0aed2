"""{% lis_deliveries batch %}: the slide's LIS messages and their delivery state, for the slide page."""

from __future__ import annotations

from django import template

from lis.models import OutboxMessage
from lis.permissions import can_resend

register = template.Library()


@register.inclusion_tag("lis/_deliveries.html", takes_context=True)
def lis_deliveries(context, batch) -> dict:
    request = context.get("request")
    rows = OutboxMessage.objects.filter(batch=batch).select_related("destination", "report_version").order_by("-id")
    return {
        "messages_sent": list(rows),
        "can_resend": bool(request and can_resend(request.user)),
        "next": request.get_full_path() if request else "",
        "csrf_token": context.get("csrf_token"),
    }
