"""LIS pages: settings (message settings, destinations, the code table with the lab's overrides), the delivery
list (every message and its state, with a manual resend), one message with its attempts, and a slide's deliveries."""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from accounts.scoping import get_scoped_or_404, scoped
from reports.differential import category_labels
from reports.models import Batch
from wbc_ml.datasets import WBC_CLASSES

from .delivery import ResendRefused, resend
from .forms import CodeOverrideForm, DestinationForm, LisSettingsForm
from .loinc import mapping_rows
from .models import Destination, LisSettings, OutboxMessage
from .permissions import can_manage_lis, can_resend


def _require_manager(request: HttpRequest) -> None:
    if not can_manage_lis(request.user) or not request.user.laboratory_id:
        raise PermissionDenied("Only your laboratory's Supervisors manage the LIS interface.")


def _labels(laboratory_id: int) -> dict[str, str]:
    return {name: name.capitalize() for name in WBC_CLASSES} | category_labels(laboratory_id)


@require_http_methods(["GET", "POST"])
def lis_settings(request: HttpRequest) -> HttpResponse:
    lab_id = request.user.laboratory_id
    if not lab_id:
        raise PermissionDenied("You do not belong to a laboratory.")
    lis = LisSettings.for_lab(lab_id)
    labels = _labels(lab_id)
    manage = can_manage_lis(request.user)
    form = LisSettingsForm(request.POST or None, instance=lis, prefix="settings")
    overrides = {
        key: CodeOverrideForm(request.POST or None, prefix=f"code-{key}", initial=lis.code_overrides.get(key, {}))
        for key in labels
    }
    status = 200
    if request.method == "POST":
        _require_manager(request)
        if form.is_valid() and all(f.is_valid() for f in overrides.values()):
            lis = form.save(commit=False)
            lis.code_overrides = {
                key: {k: v for k, v in f.cleaned_data.items() if v}
                for key, f in overrides.items()
                if f.cleaned_data.get("code")
            }
            lis.save()
            messages.success(request, "LIS settings saved.")
            return redirect("lis:settings")
        status = 400
    rows = mapping_rows(labels, lis.local_coding_system, lis.code_overrides)
    for row in rows:
        row["form"] = overrides[row["category"]]
    context = {
        "form": form,
        "rows": rows,
        "manage": manage,
        "destinations": Destination.objects.filter(laboratory_id=lab_id),
    }
    return render(request, "lis/settings.html", context, status=status)


@require_http_methods(["GET", "POST"])
def destination_edit(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    _require_manager(request)
    instance = None
    if pk is not None:
        instance = get_scoped_or_404(Destination.objects.all(), request.user, pk=pk)
    form = DestinationForm(request.POST or None, instance=instance, laboratory=request.user.laboratory)
    if request.method == "POST" and form.is_valid():
        destination = form.save()
        messages.success(request, f"Destination {destination.name} saved.")
        return redirect("lis:settings")
    status = 400 if request.method == "POST" else 200
    return render(request, "lis/destination_form.html", {"form": form, "destination": instance}, status=status)


def deliveries(request: HttpRequest) -> HttpResponse:
    queryset = scoped(OutboxMessage.objects.select_related("destination", "batch", "report_version"), request.user)
    status = request.GET.get("status", "")
    if status in OutboxMessage.Status.values:
        queryset = queryset.filter(status=status)
    page = Paginator(queryset.order_by("-id"), 50).get_page(request.GET.get("page"))
    context = {
        "page": page,
        "status": status,
        "statuses": OutboxMessage.Status.values,
        "can_resend": can_resend(request.user),
    }
    return render(request, "lis/deliveries.html", context)


def message_detail(request: HttpRequest, pk: int) -> HttpResponse:
    message = get_scoped_or_404(
        OutboxMessage.objects.select_related("destination", "batch", "report_version"), request.user, pk=pk
    )
    context = {
        "m": message,
        "attempts": message.attempts_log.all(),
        "can_resend": can_resend(request.user),
        "payload": message.payload.replace("\r", "\n"),  # ER7 segments end with CR
    }
    return render(request, "lis/message_detail.html", context)


@require_POST
def message_resend(request: HttpRequest, pk: int) -> HttpResponse:
    if not can_resend(request.user):
        raise PermissionDenied("You may not resend results.")
    message = get_scoped_or_404(OutboxMessage.objects.select_related("report_version"), request.user, pk=pk)
    try:
        resend(message)
    except ResendRefused as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{message.control_id} will be sent to {message.destination.name} again.")
    target = request.POST.get("next", "")
    return redirect(target if target.startswith("/") and not target.startswith("//") else "lis:deliveries")


def slide_deliveries(request: HttpRequest, uid) -> HttpResponse:
    """The slide's messages and their state (also embedded in the slide page with {% lis_deliveries batch %})."""
    batch = get_scoped_or_404(Batch.objects.all(), request.user, uid=uid)
    return render(request, "lis/slide_deliveries.html", {"batch": batch})
