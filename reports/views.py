from __future__ import annotations

from django.core.paginator import Paginator
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.text import slugify

from classifier.batches import recover_stale_batches
from classifier.models import Batch, BatchItem
from classifier.scoping import get_scoped_or_404, scoped

from .differential import build_differential, report_rows, summary_rows, to_csv


def _threshold(request: HttpRequest) -> float:
    try:
        value = float(request.GET.get("threshold", request.user.review_threshold))
    except ValueError:
        value = request.user.review_threshold
    return min(max(value, 0.50), 0.99)


def batch_list(request: HttpRequest) -> HttpResponse:
    batches = (
        scoped(Batch.objects.select_related("model", "user"), request.user)
        .annotate(
            n_items=Count("items"),
            n_done=Count("items", filter=Q(items__status=BatchItem.Status.DONE)),
            n_failed=Count("items", filter=Q(items__status=BatchItem.Status.FAILED)),
        )
        .order_by("-created_at", "-id")
    )
    page = Paginator(batches, 20).get_page(request.GET.get("page"))
    return render(request, "reports/batch_list.html", {"page": page})


def batch_report(request: HttpRequest, uid) -> HttpResponse:
    batch = get_scoped_or_404(Batch.objects.select_related("model", "user"), request.user, uid=uid)
    threshold = _threshold(request)
    report = build_differential(batch, threshold)
    return render(request, "reports/batch_report.html", {"batch": batch, "report": report, "threshold": threshold})


def batch_status(request: HttpRequest, uid) -> JsonResponse:
    """Progress for the live bar: done / failed / total, and an estimate of the time left."""
    batch = get_scoped_or_404(Batch, request.user, uid=uid)
    if not batch.is_finished:
        recover_stale_batches()  # a worker that died mid-batch is noticed while someone is watching
        batch.refresh_from_db()
    counts = dict(batch.items.values_list("status").annotate(n=Count("id")))
    done, failed = counts.get(BatchItem.Status.DONE, 0), counts.get(BatchItem.Status.FAILED, 0)
    total = sum(counts.values())
    eta = None
    if batch.started_at and done and not batch.is_finished:
        elapsed = (timezone.now() - batch.started_at).total_seconds()
        eta = round(elapsed / done * (total - done - failed), 1)
    return JsonResponse(
        {
            "status": batch.status,
            "done": done,
            "failed": failed,
            "total": total,
            "eta_seconds": eta,
            "error": batch.error,
        }
    )


def _csv_response(content: str, filename: str) -> HttpResponse:
    response = HttpResponse(content, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def batch_csv(request: HttpRequest, uid) -> HttpResponse:
    batch = get_scoped_or_404(Batch.objects.select_related("model"), request.user, uid=uid)
    report = build_differential(batch, _threshold(request))
    return _csv_response(to_csv(report_rows(report)), f"{slugify(batch.name) or 'batch'}-report.csv")


def batch_summary_csv(request: HttpRequest, uid) -> HttpResponse:
    batch = get_scoped_or_404(Batch.objects.select_related("model"), request.user, uid=uid)
    report = build_differential(batch, _threshold(request))
    return _csv_response(to_csv(summary_rows(report)), f"{slugify(batch.name) or 'batch'}-summary.csv")
