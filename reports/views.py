from __future__ import annotations

import contextlib
import functools
import math
import time

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.exceptions import TooManyFilesSent
from django.core.paginator import Paginator
from django.db.models import Count, Q
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.text import slugify
from django.views.decorators.http import require_http_methods, require_POST

from accounts.models import LabSettings
from accounts.scoping import get_scoped_or_404, scoped
from classifier.filters import ListFilterForm, filter_dates
from classifier.forms import ThresholdForm
from classifier.models import ClassifierModel
from classifier.services import remember_model, usable_models
from wbc_ml.review_flag import THRESHOLD_MAX, THRESHOLD_MIN

from .differential import build_differential, excel_safe, report_rows, summary_rows, to_csv
from .forms import BatchForm, EvaluationUploadForm
from .heartbeat import worker_warning
from .labels import MAX_LABEL_BYTES, LabelFileError
from .models import Batch, BatchItem, EvaluationRun
from .review import filter_review, set_wbc_count, slide_state, with_review_counts
from .services import Refused, create_evaluation, rerun_batch
from .submission import batch_limits, submit_batch, url_entries
from .uploads import UploadRefused, expand_uploads
from .wakeup import PROGRESS, listen

THRESHOLD_REFUSED = (
    f"The threshold must be a number between {THRESHOLD_MIN:.2f} and {THRESHOLD_MAX:.2f} (e.g. ?threshold=0.85)."
)


def with_threshold(view):
    """Pass the review threshold from ``?threshold=`` (else the user's own) to the view as ``threshold``.

    The same rule as the slider's form and the API: a finite number within the bounds; anything else (``nan``,
    ``inf``, text, out of range) is refused with a 400 instead of quietly changing which cells are flagged.
    """

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        raw = request.GET.get("threshold")
        if raw is None:
            return view(request, *args, threshold=request.user.review_threshold, **kwargs)
        form = ThresholdForm({"threshold": raw})
        if not form.is_valid():
            return HttpResponse(THRESHOLD_REFUSED, status=400, content_type="text/plain; charset=utf-8")
        return view(request, *args, threshold=form.cleaned_data["threshold"], **kwargs)

    return wrapped


def batch_list(request: HttpRequest) -> HttpResponse:
    """The lab's batches, filtered by status, review state, date range and accession; each row with its cells
    still to review (counted in the same query)."""
    filters = ListFilterForm(request.GET, Batch.Status.choices)
    values = filters.values
    batches = with_review_counts(
        scoped(Batch.objects.select_related("model", "user"), request.user).annotate(
            n_items=Count("items"),
            n_done=Count("items", filter=Q(items__status=BatchItem.Status.DONE)),
            n_failed=Count("items", filter=Q(items__status=BatchItem.Status.FAILED)),
        )
    )
    if values.get("status"):
        batches = batches.filter(status=values["status"])
    if values.get("accession"):
        batches = batches.filter(external_id__icontains=values["accession"])
    batches = filter_review(filter_dates(batches, values), values.get("review")).order_by("-created_at", "-id")
    page = Paginator(batches, 20).get_page(request.GET.get("page"))
    context = {"page": page, "filters": filters, "pager_query": filters.query_string(), "filtered": bool(values)}
    return render(request, "reports/batch_list.html", context)


@with_threshold
def batch_report(request: HttpRequest, uid, threshold: float) -> HttpResponse:
    batch = get_scoped_or_404(Batch.objects.select_related("model", "user"), request.user, uid=uid)
    lab_settings = LabSettings.for_lab(batch.laboratory_id)
    report = build_differential(batch, threshold, lab_settings=lab_settings)
    context = {
        "batch": batch,
        "report": report,
        "threshold": threshold,
        "worker_warning": worker_warning(batch),
        "slide": slide_state(batch, lab_settings),
    }
    return render(request, "reports/batch_report.html", context)


MAX_STATUS_WAIT_SECONDS = 10.0
STATUS_RECHECK_SECONDS = 0.5  # without a wake-up (e.g. a worker on another machine), look this often


def _number_param(request: HttpRequest, name: str, default: float, low: float, high: float) -> float:
    try:
        value = float(request.GET.get(name, default))
    except ValueError:
        return default
    return min(max(value, low), high) if math.isfinite(value) else default


def batch_status(request: HttpRequest, uid) -> JsonResponse:
    """Progress for the live bar: done / failed / total, and an estimate of the time left.

    Long polling: with ``?wait=S`` (at most 10 s) the answer waits until the batch has moved past
    ``?after=N`` processed images, or has finished, or S seconds have passed. The worker wakes the waiting
    request when it stores a chunk, so a watcher learns of progress at once without anyone polling the
    database many times a second. Nothing here re-queues work (the worker recovers batches itself); when no
    worker is running, ``worker_warning`` says since when, and there is no time-left estimate.
    """
    batch = get_scoped_or_404(Batch, request.user, uid=uid)
    wait = _number_param(request, "wait", 0.0, 0.0, MAX_STATUS_WAIT_SECONDS)
    after = _number_param(request, "after", -1, -1, 10**9)
    deadline = time.monotonic() + wait
    with listen(PROGRESS) if wait else contextlib.nullcontext() as progress:  # bound before the first look
        while True:
            batch.refresh_from_db(fields=["status", "started_at", "error"])
            counts = dict(batch.items.values_list("status").annotate(n=Count("id")))
            done, failed = counts.get(BatchItem.Status.DONE, 0), counts.get(BatchItem.Status.FAILED, 0)
            left = deadline - time.monotonic()
            if batch.is_finished or done + failed != after or left <= 0:
                break
            progress.wait(min(left, STATUS_RECHECK_SECONDS))
    total = sum(counts.values())
    warning = worker_warning(batch)
    eta = None
    if batch.started_at and done and not batch.is_finished and not warning:
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
            "worker_warning": warning,
        }
    )


def _csv_response(content: str, filename: str) -> HttpResponse:
    response = HttpResponse(content, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@with_threshold
def batch_csv(request: HttpRequest, uid, threshold: float) -> HttpResponse:
    batch = get_scoped_or_404(Batch.objects.select_related("model"), request.user, uid=uid)
    report = build_differential(batch, threshold)
    return _csv_response(to_csv(report_rows(report)), f"{slugify(batch.name) or 'batch'}-report.csv")


@with_threshold
def batch_summary_csv(request: HttpRequest, uid, threshold: float) -> HttpResponse:
    batch = get_scoped_or_404(Batch.objects.select_related("model"), request.user, uid=uid)
    report = build_differential(batch, threshold)
    return _csv_response(to_csv(summary_rows(report)), f"{slugify(batch.name) or 'batch'}-summary.csv")


# --- Evaluation runs: a finished batch scored against uploaded true labels; re-running a batch ------------------

EVALUATION_SUBSETS = [
    ("all", "All labelled images"),
    ("confident", "Confident (at/above the threshold, not an outlier)"),
    ("flagged", "Flagged for review (below the threshold, or an outlier)"),
]
PROBLEM_SECTIONS = [
    ("unknown_classes", "Unknown classes", "Rows whose class is not one of the model's classes (left out)."),
    ("duplicates", "Duplicate rows", "Files named more than once."),
    ("invalid_rows", "Incomplete rows", "Rows without a file name or a class (left out)."),
    ("unmatched_rows", "Files not in this batch", "Rows whose file the batch does not contain (left out)."),
    ("not_classified", "Labelled images the batch could not classify", "Left out: there is no prediction to score."),
    ("unlabelled_images", "Classified images without a label", "Not scored: the file has no row for them."),
]
FIGURES = {"confusion": "confusion_png", "roc": "roc_png"}


def _refuse_if_every_file_failed(batch: Batch) -> None:
    """The API's rule on the page too: a batch with no usable file is refused and nothing is stored."""
    if batch.items.exclude(status=BatchItem.Status.FAILED).exists():
        return
    reasons = list(batch.items.order_by("position", "id").values_list("error", flat=True))
    batch.delete()  # refused files have no stored image
    raise UploadRefused("None of the files could be used; nothing was stored.", *reasons)


@require_http_methods(["GET", "POST"])
@permission_required("classifier.add_prediction", raise_exception=True)
def batch_new(request: HttpRequest) -> HttpResponse:
    models_queryset = usable_models(request.user)
    initial = {"name": f"Sample {timezone.localtime():%Y-%m-%d %H:%M}"}
    status = 200
    if request.method == "POST":
        try:
            files = request.FILES
        except TooManyFilesSent:
            files = None
        form = BatchForm(request.POST, files, models_queryset=models_queryset, default_model=request.user.default_model)
        if files is None:
            form.add_error(None, f"Too many files: at most {settings.WBC_BATCH_MAX_FILES} per batch.")
        elif form.is_valid():
            data = form.cleaned_data
            try:
                entries = expand_uploads(data["files"], batch_limits()) + url_entries(data["urls"])
                if not entries:
                    raise UploadRefused("No files were chosen: add images, a .zip archive or URLs.")
                batch = submit_batch(
                    request.user,
                    entries,
                    data["model"],
                    name=data["name"],
                    external_id=data["external_id"],
                    normalization=data["normalization_spec"],
                )
                if data.get("wbc_count") is not None:
                    set_wbc_count(batch, data["wbc_count"])
                _refuse_if_every_file_failed(batch)
                remember_model(request.user, data["model"])
            except UploadRefused as exc:
                for message in exc.args:
                    form.add_error(None, message)
            else:
                return redirect("reports:batch", uid=batch.uid)
        status = 400
    else:
        form = BatchForm(initial=initial, models_queryset=models_queryset, default_model=request.user.default_model)
    limits = batch_limits()
    context = {"form": form, "max_files": limits.max_files, "max_mb": limits.max_total_bytes // (1024 * 1024)}
    return render(request, "reports/batch_new.html", context, status=status)


def _form_error(form: forms.Form) -> str:
    return " ".join(str(message) for errors in form.errors.values() for message in errors)


@require_http_methods(["GET", "POST"])
@permission_required("classifier.add_prediction", raise_exception=True)
def evaluate_batch(request: HttpRequest, uid) -> HttpResponse:
    """Upload true labels for a finished batch; success shows the new run, a refused file the reason (400)."""
    batch = get_scoped_or_404(Batch.objects.select_related("model"), request.user, uid=uid)
    form = EvaluationUploadForm(request.POST, request.FILES) if request.method == "POST" else EvaluationUploadForm()
    error, status = "", 200
    if request.method == "POST":
        if not form.is_valid():
            error = _form_error(form)
        elif form.cleaned_data["labels"].size > MAX_LABEL_BYTES:
            error = f"The label file is too large: at most {MAX_LABEL_BYTES // (1024 * 1024)} MB."
        else:
            upload = form.cleaned_data["labels"]
            try:
                run = create_evaluation(
                    request.user, batch, upload.read(), upload.name or "", form.cleaned_data["threshold"]
                )
            except (LabelFileError, Refused) as exc:
                error = str(exc)
            else:
                return redirect("reports:evaluation", uid=run.uid)
        status = 400
    context = {"batch": batch, "form": form, "error": error}
    return render(request, "reports/evaluation_upload.html", context, status=status)


@require_POST
@permission_required("classifier.add_prediction", raise_exception=True)
def rerun(request: HttpRequest, uid) -> HttpResponse:
    """Run the same stored images through another model as a new batch, so the two can be compared."""
    batch = get_scoped_or_404(Batch, request.user, uid=uid)
    model_record = get_scoped_or_404(ClassifierModel.objects.usable(), request.user, pk=request.POST.get("model"))
    try:
        new_batch = rerun_batch(request.user, batch, model_record)
    except Refused as exc:
        messages.error(request, str(exc))
        return redirect("reports:batch", uid=batch.uid)
    messages.success(request, f"The images of “{batch.name}” are queued again with {model_record}.")
    return redirect("reports:batch", uid=new_batch.uid)


def _runs(user):
    return scoped(EvaluationRun.objects.select_related("batch", "model", "user"), user)


def evaluation_list(request: HttpRequest) -> HttpResponse:
    page = Paginator(_runs(request.user).order_by("-created_at", "-id"), 20).get_page(request.GET.get("page"))
    return render(request, "reports/evaluation_list.html", {"page": page})


def _confusion_rows(report: dict, class_names: list[str]) -> list[dict]:
    rows = []
    for name, counts in zip(class_names, report.get("confusion_matrix") or [], strict=False):
        total = sum(counts)
        i = len(rows)
        cells = [{"count": c, "share": c / total if total else 0.0, "diagonal": j == i} for j, c in enumerate(counts)]
        rows.append({"name": name, "cells": cells, "total": total})
    return rows


def _class_rows(report: dict, class_names: list[str]) -> list[dict]:
    per_class, auc = report.get("per_class") or {}, report.get("roc_auc_ovr") or {}
    return [
        {"name": name, **per_class.get(name, {}), "auc": auc.get(name)} for name in class_names if name in per_class
    ]


def _problem_sections(run: EvaluationRun) -> list[dict]:
    return [
        {"key": key, "title": title, "help": help_text, "entries": run.problems.get(key) or []}
        for key, title, help_text in PROBLEM_SECTIONS
    ]


def evaluation_detail(request: HttpRequest, uid) -> HttpResponse:
    run = get_scoped_or_404(_runs(request.user), request.user, uid=uid)
    class_names = run.class_names
    overall = run.overall
    subsets = [
        {"key": key, "title": title, "report": run.metrics.get(key) or {"n": 0}} for key, title in EVALUATION_SUBSETS
    ]
    sections = _problem_sections(run)
    context = {
        "run": run,
        "overall": overall,
        "class_rows": _class_rows(overall, class_names),
        "confusion_rows": _confusion_rows(overall, class_names),
        "class_names": class_names,
        "subsets": subsets,
        "problem_sections": sections,
        "problem_total": sum(len(s["entries"]) for s in sections),
        "misclassified": run.metrics.get("misclassified") or [],
    }
    return render(request, "reports/evaluation_detail.html", context)


def evaluation_figure(request: HttpRequest, uid, kind: str) -> FileResponse:
    """A run's figure, through the lab scope (never a public media URL)."""
    run = get_scoped_or_404(EvaluationRun, request.user, uid=uid)
    if kind not in FIGURES:
        raise Http404("Unknown figure.")
    field = getattr(run, FIGURES[kind])
    if not field:
        raise Http404("This run has no such figure.")
    response = FileResponse(field.open("rb"), content_type="image/png")
    response["Cache-Control"] = "private, max-age=86400"
    return response


def _delta(a, b):
    return None if a is None or b is None else b - a


def evaluation_compare(request: HttpRequest) -> HttpResponse:
    """Two runs side by side: model, accuracy, kappa, macro-F1 and F1 per class (B − A)."""
    a_uid, b_uid = request.GET.get("a"), request.GET.get("b")
    context: dict = {
        "choices": _runs(request.user).order_by("-created_at", "-id")[:200],
        "a_uid": a_uid,
        "b_uid": b_uid,
    }
    if not (a_uid and b_uid):
        return render(request, "reports/evaluation_compare.html", context)
    run_a = get_scoped_or_404(_runs(request.user), request.user, uid=a_uid)
    run_b = get_scoped_or_404(_runs(request.user), request.user, uid=b_uid)
    all_a, all_b = run_a.overall, run_b.overall
    names = run_a.class_names + [n for n in run_b.class_names if n not in run_a.class_names]
    class_rows = []
    for name in names:
        f1_a = (all_a.get("per_class") or {}).get(name, {}).get("f1")
        f1_b = (all_b.get("per_class") or {}).get(name, {}).get("f1")
        class_rows.append({"name": name, "a": f1_a, "b": f1_b, "delta": _delta(f1_a, f1_b)})
    summary_rows = [
        {"label": label, "a": all_a.get(key), "b": all_b.get(key), "delta": _delta(all_a.get(key), all_b.get(key))}
        for key, label in [
            ("accuracy", "Accuracy"),
            ("cohen_kappa", "Cohen's kappa"),
            ("macro_f1", "Macro F1"),
            ("weighted_f1", "Weighted F1"),
            ("ece", "Calibration error (ECE)"),
        ]
    ]
    context.update(
        {
            "a": run_a,
            "b": run_b,
            "class_rows": class_rows,
            "summary_rows": summary_rows,
            "same_labels": run_a.labels_sha256 == run_b.labels_sha256,
            "same_batch": run_a.batch_id == run_b.batch_id,
        }
    )
    return render(request, "reports/evaluation_compare.html", context)


def _download_name(run: EvaluationRun, suffix: str) -> str:
    return f"evaluation-{slugify(run.batch.name) or 'batch'}-{run.uid.hex[:8]}-{suffix}"


def evaluation_metric_rows(run: EvaluationRun):
    """Long (tidy) rows: subset, class, metric, value; subset "run" describes the run itself."""
    yield ["subset", "class", "metric", "value"]
    described = [
        ("batch", run.batch.name),
        ("model", run.model.name),
        ("model_version", run.model_version),
        ("threshold", f"{run.threshold:.2f}"),
        ("labels_file", run.labels_filename),
        ("labels_sha256", run.labels_sha256),
        ("n_labelled", str(run.n_labelled)),
        ("created_at", run.created_at.isoformat(timespec="seconds")),
    ]
    for metric, value in described:
        yield ["run", "", metric, excel_safe(value)]
    class_names = run.class_names
    for subset, _ in EVALUATION_SUBSETS:
        report = run.metrics.get(subset) or {"n": 0}
        yield [subset, "", "n", str(report.get("n", 0))]
        if not report.get("n"):
            continue
        for metric in ("accuracy", "cohen_kappa", "macro_f1", "weighted_f1", "ece", "flagged_share"):
            value = report.get(metric)
            yield [subset, "", metric, "" if value is None else f"{value:.4f}"]
        for name in class_names:
            values = (report.get("per_class") or {}).get(name, {})
            for metric in ("precision", "recall", "f1"):
                yield [subset, name, metric, f"{values.get(metric, 0.0):.4f}"]
            yield [subset, name, "support", str(values.get("support", 0))]
            auc = (report.get("roc_auc_ovr") or {}).get(name)
            yield [subset, name, "roc_auc", "" if auc is None else f"{auc:.4f}"]
        for average in ("macro_avg", "weighted_avg"):
            for metric in ("precision", "recall", "f1"):
                yield [subset, average, metric, f"{(report.get(average) or {}).get(metric, 0.0):.4f}"]
        for name, counts in zip(class_names, report.get("confusion_matrix") or [], strict=False):
            for predicted, count in zip(class_names, counts, strict=False):
                yield [subset, name, f"predicted_as_{predicted}", str(count)]


def evaluation_csv(request: HttpRequest, uid) -> HttpResponse:
    run = get_scoped_or_404(_runs(request.user), request.user, uid=uid)
    return _csv_response(to_csv(evaluation_metric_rows(run)), _download_name(run, "metrics.csv"))


def evaluation_json(request: HttpRequest, uid) -> JsonResponse:
    run = get_scoped_or_404(_runs(request.user), request.user, uid=uid)
    payload = {
        "uid": str(run.uid),
        "batch": {"uid": str(run.batch.uid), "name": run.batch.name},
        "model": {"name": run.model.name, "version": run.model_version},
        "threshold": run.threshold,
        "created_at": run.created_at.isoformat(timespec="seconds"),
        "user": run.user.get_username(),
        "labels_filename": run.labels_filename,
        "labels_sha256": run.labels_sha256,
        "n_labelled": run.n_labelled,
        "metrics": run.metrics,
        "problems": run.problems,
    }
    response = JsonResponse(payload, json_dumps_params={"indent": 2})
    response["Content-Disposition"] = f'attachment; filename="{_download_name(run, "metrics.json")}"'
    return response
