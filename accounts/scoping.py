"""The one place where queries are narrowed to the caller's laboratory.

Every view and API endpoint looks objects up through :func:`scoped` or :func:`get_scoped_or_404`,
so another lab's object is indistinguishable from one that does not exist (404).
"""

from __future__ import annotations

from django.db.models import Model, Q, QuerySet
from django.http import Http404


def scoped(source: type[Model] | QuerySet, user) -> QuerySet:
    """``source`` narrowed to ``user``'s lab. Models with a nullable lab (shared models) include the shared rows."""
    queryset = source if isinstance(source, QuerySet) else source._default_manager.all()
    lab_id = getattr(user, "laboratory_id", None)
    if lab_id is None or not user.is_authenticated:
        return queryset.none()
    if queryset.model._meta.get_field("laboratory").null:
        return queryset.filter(Q(laboratory_id=lab_id) | Q(laboratory__isnull=True))
    return queryset.filter(laboratory_id=lab_id)


def get_scoped_or_404(source: type[Model] | QuerySet, user, **lookup) -> Model:
    queryset = scoped(source, user)
    try:
        return queryset.get(**lookup)
    except (queryset.model.DoesNotExist, ValueError, TypeError) as exc:
        raise Http404(f"No {queryset.model._meta.verbose_name} found.") from exc
