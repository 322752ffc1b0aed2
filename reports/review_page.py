"""The review station's page: the gallery, the live differential and the sign-off forms.

The page itself carries only the slide and what the user may do; static/js/review.js loads everything else from the
slide's ``review/state.json`` and saves each action through ``review/classify.json`` and the sign-off endpoints
(reports.review_views), so the page never reloads while a technologist works.
"""

from __future__ import annotations

from django.contrib.auth.decorators import permission_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from accounts.roles import SUPERVISOR
from accounts.scoping import get_scoped_or_404

from .models import Batch

REVIEW_PERMISSION = "classifier.add_prediction"


@permission_required("classifier.view_prediction", raise_exception=True)
def review_page(request: HttpRequest, uid) -> HttpResponse:
    batch = get_scoped_or_404(Batch.objects.select_related("model"), request.user, uid=uid)
    context = {
        "batch": batch,
        "can_review": request.user.has_perm(REVIEW_PERMISSION),
        "can_countersign": request.user.groups.filter(name=SUPERVISOR).exists(),
    }
    return render(request, "reports/review.html", context)
