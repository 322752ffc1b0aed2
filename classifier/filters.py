"""Filters of the history and batch lists: status, review state (to review / signed / unsigned), a date range and
the accession id. Each list applies them to its own queryset; the form only validates and describes them."""

from __future__ import annotations

from datetime import datetime, time, timedelta

from django import forms
from django.db.models import QuerySet
from django.http import QueryDict
from django.utils import timezone

REVIEW_CHOICES = [
    ("", "Any review state"),
    ("to_review", "Cells still to review"),
    ("signed", "Signed"),
    ("unsigned", "Not signed"),
]


class ListFilterForm(forms.Form):
    status = forms.ChoiceField(required=False, choices=[("", "Any status")])
    review = forms.ChoiceField(required=False, choices=REVIEW_CHOICES, label="Review")
    created_after = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    created_before = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))
    accession = forms.CharField(required=False, max_length=100, label="Accession")

    def __init__(self, data: QueryDict, status_choices: list[tuple[str, str]]):
        super().__init__(data)
        self.fields["status"].choices = [("", "Any status"), *status_choices]

    def clean(self):
        data = super().clean()
        after, before = data.get("created_after"), data.get("created_before")
        if after and before and after > before:
            self.add_error("created_before", "The end date is before the start date.")
        return data

    @property
    def values(self) -> dict:
        """The valid filters (an invalid form filters nothing, and shows its errors)."""
        return {k: v for k, v in self.cleaned_data.items() if v} if self.is_valid() else {}

    def query_string(self) -> str:
        """The filters as a query string prefix for the pager links ("" or "a=b&…&")."""
        params = QueryDict(mutable=True)
        for key, value in self.values.items():
            params[key] = value.isoformat() if hasattr(value, "isoformat") else value
        encoded = params.urlencode()
        return f"{encoded}&" if encoded else ""


def _start_of(day) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


def filter_dates(queryset: QuerySet, values: dict, field: str = "created_at") -> QuerySet:
    """Inclusive whole days: from 00:00 of the first day to the end of the last."""
    if values.get("created_after"):
        queryset = queryset.filter(**{f"{field}__gte": _start_of(values["created_after"])})
    if values.get("created_before"):
        queryset = queryset.filter(**{f"{field}__lt": _start_of(values["created_before"] + timedelta(days=1))})
    return queryset
