"""The adaptation pages: the lab's labelled cells and a form to start (Model admins), a job's progress and result,
and its cancel / promote / discard buttons. Every job is looked up through the lab scope (another lab's is a 404)."""

from __future__ import annotations

import json

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.scoping import get_scoped_or_404, scoped
from reports.uploads import UploadRefused
from wbc_ml.adaptation.cells import MIN_CELLS_PER_CLASS, AdaptationRefused
from wbc_ml.datasets import WBC_CLASSES

from . import services
from .cells import EVALUATION, HELD_BACK, RECOMMENDED_PER_CLASS, SOURCE_LABELS, TRAIN, VERIFIED, lab_cells
from .forms import StartForm
from .models import AdaptationJob
from .presenting import comparison, count_rows

JOBS_SHOWN = 20


@require_http_methods(["GET", "POST"])
def adaptation_page(request: HttpRequest) -> HttpResponse:
    """What the lab has to learn from (per class and source), the form, and the lab's recent jobs."""
    models_queryset = services.adaptable_models(request.user)
    form = StartForm(request.POST or None, request.FILES or None, models_queryset=models_queryset)
    status = 200
    if request.method == "POST":
        if not services.may_manage(request.user):
            raise PermissionDenied("Only your laboratory's Model admins may adapt models.")
        if form.is_valid():
            data = form.cleaned_data
            try:
                job = services.start_job(
                    request.user, data["base_model"], data["sources"], data.get("archive"), data["seed"]
                )
            except (AdaptationRefused, UploadRefused) as exc:
                form.add_error(None, str(exc))
            else:
                messages.success(request, "The adaptation is queued: the worker runs it in the background.")
                return redirect("adaptation:job", pk=job.pk)
        status = 400
    found = lab_cells(request.user, list(WBC_CLASSES), [VERIFIED, EVALUATION])
    context = {
        "form": form,
        "may_manage": services.may_manage(request.user),
        "count_rows": count_rows(found, [VERIFIED, EVALUATION]),
        "sources": [SOURCE_LABELS[VERIFIED], SOURCE_LABELS[EVALUATION]],
        "found": found,
        "short": found.short_classes(),
        "below_recommended": [n for n, c in found.counts().items() if c < RECOMMENDED_PER_CLASS],
        "minimum": MIN_CELLS_PER_CLASS,
        "recommended": RECOMMENDED_PER_CLASS,
        "jobs": scoped(AdaptationJob, request.user).select_related("base_model", "result_model", "started_by")[
            :JOBS_SHOWN
        ],
        "has_models": models_queryset.exists(),
    }
    return render(request, "adaptation/page.html", context, status=status)


@require_GET
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_scoped_or_404(AdaptationJob.objects.select_related("base_model", "result_model"), request.user, pk=pk)
    card = job.result_model.card if job.result_model else {}
    context = {
        "job": job,
        "may_manage": services.may_manage(request.user),
        "sources": [SOURCE_LABELS.get(source, source) for source in job.sources],
        "train_counts": job.counts(TRAIN),
        "held_counts": job.counts(HELD_BACK),
        "comparison": comparison(job.evaluation, list(job.base_model.class_names)) if job.evaluation else None,
        "adaptation": card.get("adaptation") or {},
        "cross_validation": (card.get("metrics") or {}).get("cross_validation"),
        "is_lab_default": job.result_model_id is not None and job.laboratory.default_model_id == job.result_model_id,
    }
    return render(request, "adaptation/job.html", context)


@require_GET
def job_status(request: HttpRequest, pk: int) -> JsonResponse:
    """Progress for the live bar: stage, share done, elapsed and remaining seconds."""
    job = get_scoped_or_404(AdaptationJob, request.user, pk=pk)
    return JsonResponse(
        {
            "status": job.status,
            "status_display": job.get_status_display(),
            "stage": job.stage,
            "progress": job.progress,
            "elapsed_seconds": job.elapsed_seconds(),
            "remaining_seconds": job.remaining_seconds(),
            "cancel_requested": job.cancel_requested,
            "finished": not job.is_active,
        }
    )


@require_GET
def job_card(request: HttpRequest, pk: int) -> HttpResponse:
    """The adapted model's full card (base model and sha256, cells per class with file names, method, metrics)."""
    job = get_scoped_or_404(AdaptationJob.objects.select_related("result_model"), request.user, pk=pk)
    if job.result_model is None:
        return JsonResponse({"error": "This adaptation has no model (it did not finish)."}, status=404)
    response = HttpResponse(json.dumps(job.result_model.card, indent=2), content_type="application/json")
    response["Content-Disposition"] = f'attachment; filename="adaptation-{job.uid}-card.json"'
    return response


def _act(request: HttpRequest, pk: int, action, done: str) -> HttpResponse:
    job = get_scoped_or_404(AdaptationJob, request.user, pk=pk)
    try:
        action(request.user, job)
    except AdaptationRefused as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, done)
    return redirect("adaptation:job", pk=job.pk)


@require_POST
def job_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    return _act(request, pk, services.cancel, "Cancel requested: the job stops at its next step, registering nothing.")


@require_POST
def job_promote(request: HttpRequest, pk: int) -> HttpResponse:
    return _act(request, pk, services.promote, "The adapted model is now your laboratory's default.")


@require_POST
def job_discard(request: HttpRequest, pk: int) -> HttpResponse:
    return _act(request, pk, services.discard, "The adapted model was discarded (switched off).")
