"""``/metrics`` for Prometheus: queue depth, images classified and their latency per model, worker heartbeats and
the LIS outbox backlog.

Where the numbers come from: the database, at scrape time, through one custom collector. The database is the one
thing every gunicorn process, worker and host shares, so whichever web process a scrape reaches answers the same
numbers, and nothing is lost when a process restarts. Per-process counters (``prometheus_client`` metrics updated
as work happens) would each see a sliver: one gunicorn process of one host, never the workers. Each app owns the
queries for its numbers (``classifier.metrics``, ``reports.metrics``, ``lis.metrics``); they are aggregates on
indexed columns. The registry holds only this collector, not ``prometheus_client``'s process and GC collectors: they
would describe whichever process answered, which changes from scrape to scrape. The one per-process number is the
scrape's own duration (``wbc_metrics_scrape_duration_seconds``), which is about this answer and nothing else.

Who may read it: a request carrying ``Authorization: Bearer <WBC_METRICS_TOKEN>`` (when that is set), or one coming
straight from an address in ``WBC_METRICS_ALLOWED_ADDRESSES`` (default: loopback only). "Straight" means without a
proxy's forwarding headers: behind a TLS proxy on the same host every request arrives from 127.0.0.1, so a
proxied request never passes on its address alone. Anyone else gets the site's ordinary 404, so the endpoint is
not advertised. The numbers carry no laboratory data: no lab, patient, accession, file or user names.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Iterator

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db import DatabaseError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from classifier import metrics as classifier_metrics
from lis import metrics as lis_metrics
from reports import metrics as reports_metrics

log = logging.getLogger(__name__)

# Set by a reverse proxy; a request carrying one came through it and is not trusted for its address.
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP")


class DatabaseCollector(Collector):
    """Every ``wbc_`` metric, computed from the shared database when Prometheus scrapes."""

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        yield from reports_metrics.collect()
        yield from classifier_metrics.collect()
        yield from lis_metrics.collect()
        yield GaugeMetricFamily(
            "wbc_metrics_scrape_duration_seconds",
            "Time this web process took to compute the wbc_ metrics from the database for this scrape.",
            value=time.perf_counter() - started,
        )


REGISTRY = CollectorRegistry(auto_describe=False)  # describing would run the queries at import: it is not done
REGISTRY.register(DatabaseCollector())


def has_token(request: HttpRequest) -> bool:
    """The request carries ``Authorization: Bearer <WBC_METRICS_TOKEN>`` (never true while no token is set)."""
    expected = settings.WBC_METRICS_TOKEN
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not expected or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


def from_allowed_address(request: HttpRequest) -> bool:
    """The peer address is in ``WBC_METRICS_ALLOWED_NETWORKS`` and no proxy forwarded the request."""
    if any(header in request.headers for header in FORWARDING_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # a server bound to [::] sees IPv4 peers as ::ffff:a.b.c.d
    return any(address in network for network in settings.WBC_METRICS_ALLOWED_NETWORKS)


@csrf_exempt  # it changes nothing; and a refused POST must be the same 404 as a GET, not CSRF's 403
@login_not_required
@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    if not (has_token(request) or from_allowed_address(request)):
        raise Http404  # the ordinary "not found", whatever the method: the endpoint is not advertised
    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET", "HEAD"])
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    try:
        body = encoder(REGISTRY)
    except DatabaseError as exc:
        log.warning("metrics: the database did not answer: %s", type(exc).__name__)
        return HttpResponse("the database did not answer\n", status=503, content_type="text/plain")
    return HttpResponse(body, content_type=content_type)
