"""The one place where queries are narrowed to the caller's laboratory.

Every view and API endpoint looks objects up through :func:`scoped` or :func:`get_scoped_or_404`,
so another lab's object is indistinguishable from one that does not exist (404).
"""

from __future__ import annotations

from django.db.models import Model, Q, QuerySet
from django.http import Http404


def lab_path(model: type[Model]) -> str:
    """The lookup from a model's rows to their laboratory: ``laboratory`` unless the model names another path in
    ``lab_path`` (e.g. ``batch__laboratory``; ``id`` for the Laboratory itself)."""
    return getattr(model, "lab_path", "laboratory")


def scoped(source: type[Model] | QuerySet, user) -> QuerySet:
    """``source`` narrowed to ``user``'s lab (through the model's ``lab_path``). Rows with no laboratory are
    included only for models that are shared across labs (``shared_across_labs = True``, e.g. bundled models)."""
    queryset = source if isinstance(source, QuerySet) else source._default_manager.all()
    lab_id = getattr(user, "laboratory_id", None)
    if lab_id is None or not user.is_authenticated:
        return queryset.none()
    path = lab_path(queryset.model)
    in_lab = Q(**{path: lab_id})
    if getattr(queryset.model, "shared_across_labs", False):
        in_lab |= Q(**{f"{path}__isnull": True})
    return queryset.filter(in_lab)


def get_scoped_or_404(source: type[Model] | QuerySet, user, **lookup) -> Model:
    queryset = scoped(source, user)
    try:
        return queryset.get(**lookup)
    except (queryset.model.DoesNotExist, ValueError, TypeError) as exc:
        raise Http404(f"No {queryset.model._meta.verbose_name} found.") from exc
