"""What a web process does once at start, before its first request (``wbcsite.wsgi`` and ``wbcsite.asgi``)."""

from __future__ import annotations

from django.urls import get_resolver

from wbcsite.thread_switching import apply_switch_interval


def import_views() -> None:
    """Import the URLconf, and so every view and what it imports, now.

    Django imports it at the first request. In a fresh process that took about 190 ms of the first request, and the
    requests that meet a fresh process, e.g. a burst of LIS submissions after a restart, all waited behind it.
    """
    get_resolver().url_patterns  # noqa: B018 (the property imports the URLconf)


def prepare_web_process() -> None:
    apply_switch_interval()
    import_views()
