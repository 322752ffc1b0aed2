from django import forms

from .models import THRESHOLD_MAX, THRESHOLD_MIN, ClassifierModel


class ClassifyForm(forms.Form):
    """One image and the model to run it through (the model list is scoped by the view)."""

    image = forms.FileField(
        required=False, allow_empty_file=True, widget=forms.ClearableFileInput(attrs={"accept": ".jpg,.jpeg,.png"})
    )
    model = forms.ModelChoiceField(queryset=ClassifierModel.objects.none(), empty_label=None)

    def __init__(self, *args, models_queryset=None, **kwargs):
        super().__init__(*args, **kwargs)
        if models_queryset is not None:
            self.fields["model"].queryset = models_queryset


class ThresholdForm(forms.Form):
    threshold = forms.FloatField(min_value=THRESHOLD_MIN, max_value=THRESHOLD_MAX)


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


class BatchForm(forms.Form):
    name = forms.CharField(max_length=200, label="Sample / batch name")
    external_id = forms.CharField(max_length=100, required=False, label="Accession id (optional)")
    files = MultipleFileField(required=False, label="Images or .zip archives")
    urls = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 3}), label="Image URLs (optional, one per line)"
    )
    model = forms.ModelChoiceField(queryset=ClassifierModel.objects.none(), empty_label=None)

    def __init__(self, *args, models_queryset=None, **kwargs):
        super().__init__(*args, **kwargs)
        if models_queryset is not None:
            self.fields["model"].queryset = models_queryset

    def clean_urls(self) -> list[str]:
        return [line.strip() for line in self.cleaned_data["urls"].splitlines() if line.strip()]


class UrlForm(forms.Form):
    url = forms.URLField(max_length=2000, assume_scheme="https", label="Image URL")
    model = forms.ModelChoiceField(queryset=ClassifierModel.objects.none(), empty_label=None)

    def __init__(self, *args, models_queryset=None, **kwargs):
        super().__init__(*args, **kwargs)
        if models_queryset is not None:
            self.fields["model"].queryset = models_queryset
