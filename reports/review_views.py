"""Slide review endpoints (JSON for the review page), sign-off forms, the printable report and the slide's history.

Everything is looked up through ``accounts.scoping`` (another lab's slide is a 404). Changes to a locked slide
(its latest report version signed) are refused with 409 and a sentence; other refusals are 400/403 with the reason.
JSON errors have the API's shape: ``{"error": {"code": "...", "message": "..."}}``.
"""

from __future__ import annotations

import csv
import io
import json
import uuid

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.text import slugify
from django.views.decorators.http import require_GET, require_POST

from accounts.models import LabSettings
from accounts.scoping import get_scoped_or_404
from classifier.models import Prediction

from . import review, thumbnails
from .differential import (
    CellRow,
    build_differential,
    category_labels,
    cell_rows,
    excel_safe,
    lab_categories,
    row_of,
)
from .models import Batch
from .slide_history import history_entries

REVIEW_PERMISSION = "classifier.add_prediction"
PLACEHOLDER = uuid.UUID(int=0)


def _batch(request: HttpRequest, uid) -> Batch:
    return get_scoped_or_404(Batch.objects.select_related("model", "laboratory", "user"), request.user, uid=uid)


def _error(message: str, status: int, code: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message}}, status=status)


def _refused(exc: review.ReviewRefused) -> JsonResponse:
    code = "slide_locked" if isinstance(exc, review.SlideLocked) else "refused"
    return _error(str(exc), exc.status, code)


class CellUrls:
    """Per-cell URLs made by string substitution (one reverse() per kind, not one per cell)."""

    def __init__(self, batch: Batch):
        self.image = reverse("classifier:prediction_image", args=[PLACEHOLDER])
        self.gradcam = reverse("classifier:saliency", args=[PLACEHOLDER, "gradcam"])
        self.thumb = reverse("reports:cell_thumb", args=[batch.uid, 0])
        self.thumb_prefix = self.thumb.rsplit("/0/", 1)

    def cell(self, row: CellRow, threshold: float) -> dict:
        uid = str(row.prediction_uid)
        image = self.image.replace(str(PLACEHOLDER), uid)
        thumb = f"{self.thumb_prefix[0]}/{row.id}/{self.thumb_prefix[1]}" if row.thumbnail else image
        return {
            "id": row.id,
            "filename": row.filename,
            "thumb_url": thumb,
            "image_url": image,
            "gradcam_url": self.gradcam.replace(str(PLACEHOLDER), uid),
            "ai_class": row.predicted_class,
            "confidence": round(row.confidence, 4),
            "flagged": row.flagged(threshold),
            "flag_reason": Prediction.reason_for(row.confidence, row.is_outlier, threshold),
            "verified_class": row.verified_class,
            "verified_by": row.verified_by,
            "verified_at": row.verified_at.isoformat(timespec="seconds") if row.verified_at else None,
        }


def _state_payload(batch: Batch, current: review.SlideState, report) -> dict:
    latest = current.latest
    return {
        "state": current.state,
        "version": current.version,
        "locked": current.locked,
        "two_person_signoff": current.two_person,
        "signed_by": latest.signed_by.get_username() if latest and latest.signed_by else None,
        "signed_at": latest.signed_at.isoformat(timespec="seconds") if latest and latest.signed_at else None,
        "countersigned_by": (latest.countersigned_by.get_username() if latest and latest.countersigned_by else None),
        "can_sign": not current.locked and batch.status == Batch.Status.DONE and report.to_review == 0,
    }


@require_GET
def review_state(request: HttpRequest, uid) -> JsonResponse:
    batch = _batch(request, uid)
    lab_settings = LabSettings.for_lab(batch.laboratory_id)
    current = review.slide_state(batch, lab_settings)
    rows, categories = cell_rows(batch), lab_categories(batch.laboratory_id)
    labels = category_labels(batch.laboratory_id, categories)
    report = build_differential(batch, batch.threshold, lab_settings=lab_settings, categories=labels, rows=rows)
    urls = CellUrls(batch)
    payload = {
        "batch": {
            "uid": str(batch.uid),
            "name": batch.name,
            "external_id": batch.external_id,
            "status": batch.status,
            "wbc_count": batch.wbc_count,
            "model": {"name": batch.model.name, "version": batch.model.version, "sha256": batch.model.sha256},
        },
        **_state_payload(batch, current, report),
        "threshold": batch.threshold,
        "categories": review.categories_for(batch.laboratory_id, categories),
        "cells": [urls.cell(row, batch.threshold) for row in rows if row.classified],
        "differential": review.differential_payload(report),
        "counts": report.counts,
        "out_of_scope": report.out_of_scope,
        "urls": {
            "classify": reverse("reports:review_classify", args=[batch.uid]),
            "sign": reverse("reports:review_sign", args=[batch.uid]),
            "countersign": reverse("reports:review_countersign", args=[batch.uid]),
            "amend": reverse("reports:review_amend", args=[batch.uid]),
            "print": reverse("reports:report_print", args=[batch.uid]),
            "history": reverse("reports:slide_history", args=[batch.uid]),
            "report": reverse("reports:batch", args=[batch.uid]),
        },
    }
    return JsonResponse(payload)


@require_POST
def review_classify(request: HttpRequest, uid) -> JsonResponse:
    """Body (JSON): {"cells": [id, ...], "class": key or null}. Answers the changed cells and the new differential."""
    batch = _batch(request, uid)
    if not request.user.has_perm(REVIEW_PERMISSION):
        return _error("You may not reclassify cells.", 403, "permission_denied")
    try:
        body = json.loads(request.body or b"{}")
        cells, new_class = body["cells"], body.get("class")
        if not isinstance(cells, list) or not (new_class is None or isinstance(new_class, str)):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return _error('Send JSON: {"cells": [cell ids], "class": a class key or null}.', 400, "invalid")
    lab_settings, categories = LabSettings.for_lab(batch.laboratory_id), lab_categories(batch.laboratory_id)
    try:
        items = review.reclassify(
            request.user, batch, cells, new_class, lab_settings=lab_settings, categories=categories
        )
    except review.ReviewRefused as exc:
        return _refused(exc)
    labels = category_labels(batch.laboratory_id, categories)
    report = build_differential(
        batch, batch.threshold, lab_settings=lab_settings, categories=labels, rows=cell_rows(batch)
    )
    urls = CellUrls(batch)
    return JsonResponse(
        {
            "cells": [urls.cell(row_of(item), batch.threshold) for item in items],
            "differential": review.differential_payload(report),
            "counts": report.counts,
            "out_of_scope": report.out_of_scope,
            "to_review": report.to_review,
        }
    )


def _wants_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _signoff_response(request: HttpRequest, batch: Batch, action, *args) -> HttpResponse:
    """Run a sign-off action; JSON for the page's fetch, else a redirect (success) or a page with the reason."""
    try:
        version = action(request.user, batch, *args)
    except review.ReviewRefused as exc:
        if _wants_json(request):
            return _refused(exc)
        context = {"batch": batch, "reason": str(exc)}
        return render(request, "reports/review_refused.html", context, status=exc.status)
    current = review.slide_state(batch)
    if _wants_json(request):
        return JsonResponse({"state": current.state, "version": version.number, "locked": current.locked})
    messages.success(request, f"Version {version.number}: {current.state}.")
    return redirect("reports:review", uid=batch.uid)


@require_POST
def review_sign(request: HttpRequest, uid) -> HttpResponse:
    batch = _batch(request, uid)
    if not request.user.has_perm(REVIEW_PERMISSION):
        raise PermissionDenied("You may not sign reports.")
    return _signoff_response(request, batch, review.sign, request.POST.get("password", ""))


@require_POST
def review_countersign(request: HttpRequest, uid) -> HttpResponse:
    batch = _batch(request, uid)
    return _signoff_response(request, batch, review.countersign, request.POST.get("password", ""))


@require_POST
def review_amend(request: HttpRequest, uid) -> HttpResponse:
    batch = _batch(request, uid)
    if not request.user.has_perm(REVIEW_PERMISSION):
        raise PermissionDenied("You may not amend reports.")
    return _signoff_response(request, batch, review.amend, request.POST.get("reason", ""))


@require_POST
def wbc_count(request: HttpRequest, uid) -> HttpResponse:
    """Set (or clear, with an empty field) the sample's total WBC count on an unsigned slide."""
    batch = _batch(request, uid)
    if not request.user.has_perm(REVIEW_PERMISSION):
        raise PermissionDenied("You may not change this slide.")
    raw = request.POST.get("wbc_count", "").strip().replace(",", ".")
    try:
        review.set_wbc_count(batch, float(raw) if raw else None)
    except ValueError as exc:  # not a number, or refused (ReviewRefused is a ValueError too)
        message = str(exc) if isinstance(exc, review.ReviewRefused) else "The total WBC count must be a number."
        status = exc.status if isinstance(exc, review.ReviewRefused) else 400
        return render(request, "reports/review_refused.html", {"batch": batch, "reason": message}, status=status)
    messages.success(request, "The total WBC count is saved." if raw else "The total WBC count is cleared.")
    return redirect("reports:batch", uid=batch.uid)


def cell_thumb(request: HttpRequest, uid, item_id: int) -> FileResponse:
    """A cell's gallery thumbnail, through the lab scope (never a public media URL)."""
    batch = _batch(request, uid)
    item = batch.items.filter(pk=item_id).first()
    if item is None or not item.thumbnail:
        raise Http404("No thumbnail.")
    response = FileResponse(item.thumbnail.open("rb"), content_type=thumbnails.content_type(item.thumbnail.name))
    response["Cache-Control"] = "private, max-age=86400"
    return response


# --- the printable report and the slide's history ------------------------------------------------------------------


def report_print(request: HttpRequest, uid) -> HttpResponse:
    """The report ready for paper or "Save as PDF": the current version (live while unsigned), ?version=N for an
    older one (its snapshot, exactly as signed)."""
    batch = _batch(request, uid)
    lab_settings = LabSettings.for_lab(batch.laboratory_id)
    current = review.slide_state(batch, lab_settings)
    versions = list(batch.report_versions.order_by("number"))
    asked = request.GET.get("version")
    if asked:
        version = next((v for v in versions if str(v.number) == asked.strip()), None)
        if version is None:
            raise Http404("No such version.")
    else:
        version = current.latest
    if version is not None and version.signed_at is not None:
        snapshot, live = version.snapshot, False
    else:
        snapshot, live = review.live_snapshot(batch, lab_settings), True
    state = review.state_of(version, lab_settings.two_person_signoff).state if version else current.state
    context = {"batch": batch, "s": snapshot, "live": live, "state": state, "versions": versions, "shown": version}
    return render(request, "reports/report_print.html", context)


def slide_history(request: HttpRequest, uid) -> HttpResponse:
    batch = _batch(request, uid)
    return render(request, "reports/history.html", {"batch": batch, "entries": history_entries(batch)})


HISTORY_COLUMNS = ["time", "user", "action", "object", "before", "after"]


def slide_history_csv(request: HttpRequest, uid) -> HttpResponse:
    batch = _batch(request, uid)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(HISTORY_COLUMNS)
    for e in history_entries(batch):
        writer.writerow([e.when.isoformat(timespec="seconds"), *(excel_safe(x) for x in e.row())])
    response = HttpResponse(buffer.getvalue(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{slugify(batch.name) or "slide"}-history.csv"'
    return response
