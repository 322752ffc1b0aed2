"""The audit trail: an append-only history row for every change of the records a clinical lab must account for.

django-simple-history keeps the rows; every historical table lives in this app (``app="audit"``), so the audit
trail is one place with its own migrations. The app sets the acting user (``instance._history_user``) and a reason
(``instance._change_reason``) where it knows them. Rows are never updated or deleted: the admin is read-only and
on PostgreSQL a trigger refuses UPDATE and DELETE (migration 0002).
"""

from __future__ import annotations

from django.db import models
from simple_history import register

from accounts.models import ApiToken, CellCategory, Laboratory, LabSettings
from adaptation.models import AdaptationJob
from classifier.models import ClassifierModel
from reports.models import CellVerification, ReportVersion


def _acting_user(instance, request=None, **_kwargs):
    """The user the code set on the instance, else the signed-in user of the request (simple-history's rule)."""
    user = getattr(request, "user", None)
    return user if user is not None and user.is_authenticated else None


def _token_owner(instance, request=None, **kwargs):
    """Tokens are created and revoked by their owner unless the code says otherwise (an administrator)."""
    return _acting_user(instance, request, **kwargs) or instance.user


AUDITED = [
    # (model, extra options). The acting user is kept as a plain id: removing an account never rewrites the trail.
    (CellVerification, {}),
    (ReportVersion, {}),
    (LabSettings, {}),
    (Laboratory, {}),  # the lab's default model
    (CellCategory, {}),
    (ApiToken, {"excluded_fields": ["digest", "last_used_at"], "get_user": _token_owner}),
    (ClassifierModel, {"excluded_fields": ["card"]}),
    # who started, cancelled, promoted and discarded an adaptation (the progress moves by updates, not audited)
    (AdaptationJob, {"excluded_fields": ["cells", "evaluation", "stage", "progress", "updated_at"]}),
]

for _model, _options in AUDITED:
    register(
        _model,
        app="audit",
        history_user_id_field=models.BigIntegerField(null=True, blank=True, db_index=True),
        get_user=_options.pop("get_user", _acting_user),
        **_options,
    )

HISTORICAL_MODELS: list[type[models.Model]] = [model.history.model for model, _ in AUDITED]
for _model, _ in AUDITED:  # a history row is in the scope of its record's laboratory (accounts.scoping)
    _model.history.model.lab_path = getattr(_model, "lab_path", "laboratory")
    _model.history.model.shared_across_labs = getattr(_model, "shared_across_labs", False)
