"""The user's own API tokens page (/account/tokens/): create (the key is shown once), list, revoke."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from .forms import CategoryFormSet, LabSettingsForm
from .models import ApiToken, CellCategory, LabSettings, TooManyTokens
from .roles import can_manage_lab


def _own_token(user, raw_id: str) -> ApiToken | None:
    """A token of this user (tokens are scoped to their owner, not only to the lab); None if not theirs."""
    try:
        return ApiToken.objects.filter(user=user).get(pk=int(raw_id))
    except (TypeError, ValueError, ApiToken.DoesNotExist):
        return None


@require_http_methods(["GET", "POST"])
def tokens(request: HttpRequest) -> HttpResponse:
    new_key, new_token, error, status = "", None, "", 200
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "create":
            name = request.POST.get("name", "").strip()
            if not name or len(name) > 100:
                error, status = "Give the token a name of 1 to 100 characters (e.g. “LIS production”).", 400
            else:
                try:
                    # Rendered, not redirected: the key exists only in this response and is never stored.
                    new_token, new_key = ApiToken.issue_within_limit(request.user, name)
                    status = 201
                except TooManyTokens as exc:
                    error, status = str(exc), 400
        elif action == "revoke":
            token = _own_token(request.user, request.POST.get("token"))
            if token is None:
                error, status = "That token does not exist (or is not yours).", 404
            else:
                token.revoke()
                messages.success(request, f"The token “{token.name}” is revoked; requests with it now fail.")
                return redirect("accounts:tokens")
        else:
            error, status = "Unknown action.", 400
    context = {
        "tokens": request.user.api_tokens.all(),
        "new_key": new_key,
        "new_token": new_token,
        "error": error,
        "max_tokens": settings.WBC_API_MAX_TOKENS_PER_USER,
    }
    response = render(request, "accounts/tokens.html", context, status=status)
    response["Cache-Control"] = "no-store"
    return response


@require_http_methods(["GET", "POST"])
def lab_settings(request: HttpRequest) -> HttpResponse:
    """/settings/lab/: count target, sign-off rules, out-of-scope limit, reference ranges and cell categories.
    Every saved change is an audit row with the user's name."""
    if not can_manage_lab(request.user):
        raise PermissionDenied("Only Model admins and Supervisors change the laboratory's settings.")
    lab_id = request.user.laboratory_id
    settings_row = LabSettings.for_lab(lab_id)
    CellCategory.for_lab(lab_id)
    categories = CellCategory.objects.filter(laboratory_id=lab_id)
    data = request.POST if request.method == "POST" else None
    form = LabSettingsForm(data, instance=settings_row)
    formset = CategoryFormSet(data, queryset=categories, prefix="categories", laboratory=request.user.laboratory)
    status = 200
    if request.method == "POST":
        if form.is_valid() and formset.is_valid():
            with transaction.atomic():
                row = form.save(commit=False)
                row._history_user, row._change_reason = request.user, "lab settings changed"
                row.save()
                for category in formset.save(commit=False):
                    category.laboratory_id = lab_id
                    category._history_user, category._change_reason = request.user, "cell category changed"
                    category.save()
            messages.success(request, "The laboratory settings are saved.")
            return redirect("accounts:lab_settings")
        status = 400
    context = {"form": form, "formset": formset}
    return render(request, "accounts/lab_settings.html", context, status=status)
