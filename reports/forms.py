"""The batch submission form and the true-labels upload form."""

from __future__ import annotations

from django import forms

from classifier.forms import ModelAndNormalizationForm
from wbc_ml.review_flag import THRESHOLD_MAX, THRESHOLD_MIN


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """Several files in one field (Django's documented recipe); empty files reach our own checks."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput(attrs={"multiple": True, "accept": ".jpg,.jpeg,.png,.zip"}))
        super().__init__(*args, allow_empty_file=True, **kwargs)

    def clean(self, data, initial=None):
        if isinstance(data, list | tuple):
            return [super(MultipleFileField, self).clean(item, initial) for item in data]
        return [super().clean(data, initial)] if data else []


class BatchForm(ModelAndNormalizationForm):
    name = forms.CharField(max_length=200, label="Sample / batch name")
    external_id = forms.CharField(max_length=100, required=False, label="Accession id (optional)")
    files = MultipleFileField(required=False, label="Images or .zip archives")
    urls = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 3}), label="Image URLs (optional, one per line)"
    )
    wbc_count = forms.FloatField(
        required=False,
        min_value=0,
        max_value=1000,
        label="Total WBC count, ×10⁹/L (optional: gives absolute counts)",
    )

    field_order = [
        "name",
        "external_id",
        "wbc_count",
        "files",
        "urls",
        "model",
        "normalization",
        "norm_mean",
        "norm_std",
    ]

    def clean_urls(self) -> list[str]:
        return [line.strip() for line in self.cleaned_data["urls"].splitlines() if line.strip()]


class EvaluationUploadForm(forms.Form):
    """The true labels (any content type: browsers send text/csv, application/vnd.ms-excel, …) and a threshold."""

    labels = forms.FileField(
        label="True labels (CSV with the columns filename,class)",
        error_messages={"required": "Choose the CSV file with the true labels (columns filename,class)."},
    )
    threshold = forms.FloatField(
        required=False,
        min_value=THRESHOLD_MIN,
        max_value=THRESHOLD_MAX,
        error_messages={
            "invalid": f"The threshold must be a number between {THRESHOLD_MIN:.2f} and {THRESHOLD_MAX:.2f}."
        },
    )
