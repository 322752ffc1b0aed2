from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.paginator import Paginator
from django.db.models import BooleanField, ExpressionWrapper, F, Q
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from accounts.scoping import get_scoped_or_404, scoped
from wbc_ml.inference import ModelUnavailable
from wbc_ml.preprocessing import ImageRejected
from wbc_ml.review_flag import THRESHOLD_MAX, THRESHOLD_MIN
from wbc_ml.vetting import ModelRejected

from .custom_models import register_custom_model
from .fetch import UrlRefused, fetch_url
from .filters import ListFilterForm, filter_dates
from .forms import ClassifyForm, CustomModelForm, ThresholdForm, UrlForm
from .models import ClassifierModel, Prediction
from .services import (
    UploadedImage,
    classify_image,
    ensure_saliency,
    read_upload,
    saliency_content_type,
    usable_models,
)

SALIENCY_LABELS = {"gradcam": "Grad-CAM", "gradient": "Input gradient"}


def model_unavailable(request: HttpRequest, error: ModelUnavailable) -> HttpResponse:
    return render(request, "classifier/model_unavailable.html", {"error": str(error)}, status=503)


@require_http_methods(["GET", "POST"])
@permission_required("classifier.add_prediction", raise_exception=True)
def classify(request: HttpRequest) -> HttpResponse:
    models_queryset = usable_models(request.user)
    form = ClassifyForm(
        request.POST or None,
        request.FILES or None,
        models_queryset=models_queryset,
        default_model=request.user.default_model,
    )
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                upload = read_upload(form.cleaned_data["image"])
                prediction = classify_image(
                    request.user, upload, form.cleaned_data["model"], form.cleaned_data["normalization_spec"]
                )
            except ImageRejected as exc:
                form.add_error("image", str(exc))
            except ModelUnavailable as exc:
                return model_unavailable(request, exc)
            else:
                return redirect("classifier:prediction", uid=prediction.uid)
        status = 400
    url_form = UrlForm(models_queryset=models_queryset, default_model=request.user.default_model)
    return _classify_page(request, form, url_form, status)


def _classify_page(request, form, url_form, status=200):
    models_queryset = usable_models(request.user)
    recent = scoped(Prediction, request.user).select_related("model")[:8]
    context = {"form": form, "url_form": url_form, "recent": recent, "has_models": models_queryset.exists()}
    return render(request, "classifier/classify.html", context, status=status)


@require_POST
@permission_required("classifier.add_prediction", raise_exception=True)
def classify_url(request: HttpRequest) -> HttpResponse:
    """Fetch an image from an http(s) URL through the safe fetcher, then classify it like an upload."""
    models_queryset = usable_models(request.user)
    url_form = UrlForm(request.POST, models_queryset=models_queryset)
    if url_form.is_valid():
        try:
            name, data = fetch_url(url_form.cleaned_data["url"], user_id=request.user.pk)
            prediction = classify_image(
                request.user,
                UploadedImage(name, data),
                url_form.cleaned_data["model"],
                url_form.cleaned_data["normalization_spec"],
            )
        except (UrlRefused, ImageRejected) as exc:
            url_form.add_error("url", str(exc))
        except ModelUnavailable as exc:
            return model_unavailable(request, exc)
        else:
            return redirect("classifier:prediction", uid=prediction.uid)
    form = ClassifyForm(models_queryset=models_queryset, default_model=request.user.default_model)
    return _classify_page(request, form, url_form, status=400)


def prediction_detail(request: HttpRequest, uid) -> HttpResponse:
    prediction = get_scoped_or_404(Prediction.objects.select_related("model", "user"), request.user, uid=uid)
    method = request.GET.get("saliency", "gradcam")
    if method not in SALIENCY_LABELS:
        method = "gradcam"
    threshold = request.user.review_threshold
    context = {
        "p": prediction,
        "threshold": threshold,
        "needs_review": prediction.needs_review(threshold),
        "review_reason": prediction.flag_reason(float("inf")),  # the reason, whatever threshold the slider sets
        "probabilities": prediction.ranked_probabilities(),
        "method": method,
        "methods": SALIENCY_LABELS,
    }
    return render(request, "classifier/prediction_detail.html", context)


def prediction_image(request: HttpRequest, uid) -> FileResponse:
    prediction = get_scoped_or_404(Prediction, request.user, uid=uid)
    content_type = "image/png" if prediction.image.name.endswith(".png") else "image/jpeg"
    return FileResponse(prediction.image.open("rb"), content_type=content_type)


def prediction_saliency(request: HttpRequest, uid, method: str) -> HttpResponse:
    prediction = get_scoped_or_404(Prediction.objects.with_model(), request.user, uid=uid)
    if method not in SALIENCY_LABELS:
        raise Http404("Unknown saliency method.")
    try:
        field = ensure_saliency(prediction, method)
    except ModelUnavailable as exc:
        return model_unavailable(request, exc)
    response = FileResponse(field.open("rb"), content_type=saliency_content_type(field))
    response["Cache-Control"] = "private, max-age=86400"
    return response


HISTORY_STATUS = [("flagged", "Flagged for review"), ("clear", "Not flagged")]
# A cell of a slide still to review: flagged at the slide's threshold and without a technologist's class.
CELL_TO_REVIEW = Q(batch_item__isnull=False, batch_item__verification__isnull=True) & (
    Q(confidence__lt=F("batch_item__batch__threshold")) | Q(is_outlier=True)
)
# A slide is signed when it has a signed version and no open (unsigned) one.
SIGNED = "batch_item__batch__report_versions__signed_at__isnull"


def history(request: HttpRequest) -> HttpResponse:
    """Classified images, filtered by review flag, review state, date range and accession."""
    threshold = request.user.review_threshold
    filters = ListFilterForm(request.GET, HISTORY_STATUS)
    values = filters.values
    predictions = scoped(Prediction.objects.select_related("model", "user"), request.user).annotate(
        to_review=ExpressionWrapper(CELL_TO_REVIEW, output_field=BooleanField())
    )
    flagged = Q(confidence__lt=threshold) | Q(is_outlier=True)
    if values.get("status"):
        predictions = predictions.filter(flagged) if values["status"] == "flagged" else predictions.exclude(flagged)
    if values.get("accession"):
        predictions = predictions.filter(batch_item__batch__external_id__icontains=values["accession"])
    review = values.get("review")
    if review == "to_review":
        predictions = predictions.filter(to_review=True)
    elif review == "signed":
        predictions = predictions.filter(**{SIGNED: False}).exclude(**{SIGNED: True})
    elif review == "unsigned":
        predictions = predictions.exclude(Q(**{SIGNED: False}) & ~Q(**{SIGNED: True}))
    predictions = filter_dates(predictions, values).distinct()
    page = Paginator(predictions, 25).get_page(request.GET.get("page"))
    context = {
        "page": page,
        "threshold": threshold,
        "filters": filters,
        "pager_query": filters.query_string(),
        "filtered": bool(values),
        "n_to_review": predictions.filter(to_review=True).count(),
    }
    return render(request, "classifier/history.html", context)


@require_POST
def update_threshold(request: HttpRequest) -> HttpResponse:
    """Remember the user's review threshold (fetch from the slider, or a plain form post)."""
    form = ThresholdForm(request.POST)
    wants_json = request.headers.get("Accept", "").startswith("application/json")
    if not form.is_valid():
        if wants_json:
            return JsonResponse({"error": form.errors.get_json_data()}, status=400)
        messages.error(request, f"The threshold must be between {THRESHOLD_MIN:.2f} and {THRESHOLD_MAX:.2f}.")
    else:
        request.user.review_threshold = round(form.cleaned_data["threshold"], 2)
        request.user.save(update_fields=["review_threshold"])
        if wants_json:
            return JsonResponse({"threshold": request.user.review_threshold})
        messages.success(request, f"Review threshold saved: {request.user.review_threshold:.2f}.")
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(target, {request.get_host()}, require_https=request.is_secure()):
        target = "classifier:classify"
    return redirect(target)


def model_list(request: HttpRequest) -> HttpResponse:
    """The models this lab can use: bundled ones with their cards, and the lab's own uploads."""
    records = scoped(ClassifierModel.objects.select_related("uploaded_by"), request.user).order_by(
        "-is_bundled", "name", "-created_at"
    )
    can_manage = request.user.has_perm("classifier.change_classifiermodel")
    lab_default_id = request.user.laboratory.default_model_id if request.user.laboratory_id else None
    context = {"records": records, "can_manage": can_manage, "lab_default_id": lab_default_id}
    return render(request, "classifier/model_list.html", context)


@require_POST
@permission_required("classifier.change_classifiermodel", raise_exception=True)
def model_make_lab_default(request: HttpRequest, pk: int) -> HttpResponse:
    """A Model admin makes a model the lab's default: the API and batches sent without a model use it (not the
    users' remembered web choices). The change goes through save() so the audit trail records who and when."""
    record = get_scoped_or_404(ClassifierModel.objects.usable(), request.user, pk=pk)
    lab = request.user.laboratory
    lab.default_model = record
    lab._history_user = request.user  # read by django-simple-history when Laboratory is registered
    lab._change_reason = f"lab default model -> {record}"[:100]
    lab.save(update_fields=["default_model"])
    messages.success(request, f"{record} is now your laboratory's default model (API and batches without a model).")
    return redirect("classifier:models")


@require_http_methods(["GET", "POST"])
@permission_required("classifier.add_classifiermodel", raise_exception=True)
def model_upload(request: HttpRequest) -> HttpResponse:
    form = CustomModelForm(request.POST or None, request.FILES or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            data = form.cleaned_data
            try:
                record = register_custom_model(
                    request.user,
                    data["file"],
                    name=data["name"],
                    class_names=data["class_order"],
                    normalization=data["normalization_spec"],
                )
            except ModelRejected as exc:
                form.add_error("file", f"{data['file'].name}: {exc}")
            else:
                messages.success(request, f"{record} was validated and is ready for your laboratory.")
                return redirect("classifier:models")
        status = 400
    return render(request, "classifier/model_upload.html", {"form": form}, status=status)


@require_POST
@permission_required("classifier.change_classifiermodel", raise_exception=True)
def model_toggle(request: HttpRequest, pk: int) -> HttpResponse:
    """Model admins switch their lab's own models on and off (bundled models are managed in the admin)."""
    record = get_scoped_or_404(ClassifierModel.objects.filter(is_bundled=False), request.user, pk=pk)
    if record.laboratory_id != request.user.laboratory_id:
        raise Http404("No model found.")
    record.is_active = not record.is_active
    record._history_user = request.user  # the audit trail (django-simple-history) records who switched it
    record._change_reason = "model activated" if record.is_active else "model deactivated"
    record.save(update_fields=["is_active"])
    messages.success(request, f"{record} is now {'active' if record.is_active else 'inactive'}.")
    return redirect("classifier:models")
