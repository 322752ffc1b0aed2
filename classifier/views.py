from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from .forms import ClassifyForm, ThresholdForm
from .inference import ModelUnavailable
from .models import ClassifierModel, Prediction
from .preprocessing import ImageRejected
from .scoping import get_scoped_or_404, scoped
from .services import classify_image, ensure_saliency, read_upload

SALIENCY_LABELS = {"gradcam": "Grad-CAM", "gradient": "Input gradient"}


def _models_for(user):
    return scoped(ClassifierModel.objects.usable(), user)


def model_unavailable(request: HttpRequest, error: ModelUnavailable) -> HttpResponse:
    return render(request, "classifier/model_unavailable.html", {"error": str(error)}, status=503)


@require_http_methods(["GET", "POST"])
@permission_required("classifier.add_prediction", raise_exception=True)
def classify(request: HttpRequest) -> HttpResponse:
    models_queryset = _models_for(request.user)
    form = ClassifyForm(request.POST or None, request.FILES or None, models_queryset=models_queryset)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                upload = read_upload(form.cleaned_data["image"])
                prediction = classify_image(request.user, upload, form.cleaned_data["model"])
            except ImageRejected as exc:
                form.add_error("image", str(exc))
            except ModelUnavailable as exc:
                return model_unavailable(request, exc)
            else:
                return redirect("classifier:prediction", uid=prediction.uid)
        status = 400
    recent = scoped(Prediction, request.user).select_related("model")[:8]
    context = {"form": form, "recent": recent, "has_models": models_queryset.exists()}
    return render(request, "classifier/classify.html", context, status=status)


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
    prediction = get_scoped_or_404(Prediction.objects.select_related("model"), request.user, uid=uid)
    if method not in SALIENCY_LABELS:
        raise Http404("Unknown saliency method.")
    try:
        field = ensure_saliency(prediction, method)
    except ModelUnavailable as exc:
        return model_unavailable(request, exc)
    response = FileResponse(field.open("rb"), content_type="image/png")
    response["Cache-Control"] = "private, max-age=86400"
    return response


def history(request: HttpRequest) -> HttpResponse:
    predictions = scoped(Prediction.objects.select_related("model", "user"), request.user)
    page = Paginator(predictions, 25).get_page(request.GET.get("page"))
    return render(request, "classifier/history.html", {"page": page, "threshold": request.user.review_threshold})


@require_POST
def update_threshold(request: HttpRequest) -> HttpResponse:
    """Remember the user's review threshold (fetch from the slider, or a plain form post)."""
    form = ThresholdForm(request.POST)
    wants_json = request.headers.get("Accept", "").startswith("application/json")
    if not form.is_valid():
        if wants_json:
            return JsonResponse({"error": form.errors.get_json_data()}, status=400)
        messages.error(request, "The threshold must be between 0.50 and 0.99.")
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
