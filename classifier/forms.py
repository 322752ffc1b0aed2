import json

from django import forms

from wbc_ml.preprocessing import Normalization
from wbc_ml.review_flag import THRESHOLD_MAX, THRESHOLD_MIN

from .models import NORMALIZATION_LABELS, ClassifierModel


class ModelSelect(forms.Select):
    """Each option carries its model's own normalisation, so the page can show defaults and warn."""

    def create_option(self, name, value, label, selected, index, subindex=None, attrs=None):
        option = super().create_option(name, value, label, selected, index, subindex, attrs)
        instance = getattr(value, "instance", None)
        if instance is not None:
            option["attrs"]["data-normalization"] = json.dumps(instance.normalization)
        return option


class ModelChoiceField(forms.ModelChoiceField):
    widget = ModelSelect

    def __init__(self, **kwargs):
        super().__init__(queryset=ClassifierModel.objects.none(), empty_label=None, **kwargs)

    def label_from_instance(self, obj: ClassifierModel) -> str:
        return obj.choice_label()


def _triplet(text: str, label: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError as exc:
        raise forms.ValidationError(f"{label}: three numbers separated by commas, e.g. 127.5, 127.5, 127.5") from exc
    if len(values) != 3:
        raise forms.ValidationError(f"{label}: give exactly three numbers (red, green, blue)")
    return values


def zscore_spec(mean_text: str, std_text: str) -> dict:
    """A validated z-score normalisation from two 'r, g, b' texts."""
    spec = {"method": "zscore", "mean": list(_triplet(mean_text, "Mean")), "std": list(_triplet(std_text, "Std"))}
    try:
        Normalization.from_dict(spec)
    except ValueError as exc:
        raise forms.ValidationError(str(exc)) from exc
    return spec


class ModelAndNormalizationForm(forms.Form):
    """The model dropdown and the normalisation dropdown (default: the model's own, from its card)."""

    model = ModelChoiceField()
    normalization = forms.ChoiceField(
        choices=[("", "The model's own (from its card)"), *NORMALIZATION_LABELS.items()],
        required=False,
        label="Normalisation",
    )
    norm_mean = forms.CharField(required=False, label="Mean (R, G, B)", widget=forms.TextInput(attrs={"size": 18}))
    norm_std = forms.CharField(required=False, label="Std (R, G, B)", widget=forms.TextInput(attrs={"size": 18}))

    def __init__(self, *args, models_queryset=None, default_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        if models_queryset is not None:
            self.fields["model"].queryset = models_queryset
            if default_model is not None and models_queryset.filter(pk=default_model.pk).exists():
                self.fields["model"].initial = default_model.pk

    def chosen_normalization(self) -> dict | None:
        """None for the model's own; else the user's choice (mean/std default to the card's for z-score)."""
        method = self.cleaned_data.get("normalization")
        if not method:
            return None
        if method == "scale01":
            return {"method": "scale01"}
        own = self.cleaned_data["model"].normalization
        mean = self.cleaned_data.get("norm_mean") or ", ".join(str(v) for v in own.get("mean", [127.5] * 3))
        std = self.cleaned_data.get("norm_std") or ", ".join(str(v) for v in own.get("std", [127.5] * 3))
        return zscore_spec(mean, std)

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("model") is not None:
            cleaned["normalization_spec"] = self.chosen_normalization()
        return cleaned


class ClassifyForm(ModelAndNormalizationForm):
    """One image and the model to run it through (the model list is scoped by the view)."""

    image = forms.FileField(
        required=False, allow_empty_file=True, widget=forms.ClearableFileInput(attrs={"accept": ".jpg,.jpeg,.png"})
    )


class UrlForm(ModelAndNormalizationForm):
    url = forms.URLField(max_length=2000, assume_scheme="https", label="Image URL")


class ThresholdForm(forms.Form):
    threshold = forms.FloatField(min_value=THRESHOLD_MIN, max_value=THRESHOLD_MAX)


WBC_CLASS_ORDER = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")


class CustomModelForm(forms.Form):
    name = forms.CharField(max_length=120)
    file = forms.FileField(label="Model file (.keras or .h5)", allow_empty_file=True)
    class_order = forms.CharField(
        initial=", ".join(WBC_CLASS_ORDER),
        help_text="The model's outputs in order. Default: alphabetical, what the common Keras recipes produce.",
    )
    normalization = forms.ChoiceField(
        choices=list(NORMALIZATION_LABELS.items()), initial="scale01", label="Normalisation"
    )
    norm_mean = forms.CharField(required=False, label="Mean (R, G, B)", initial="127.5, 127.5, 127.5")
    norm_std = forms.CharField(required=False, label="Std (R, G, B)", initial="127.5, 127.5, 127.5")

    def clean_class_order(self) -> list[str]:
        names = [n.strip().lower() for n in self.cleaned_data["class_order"].split(",") if n.strip()]
        unknown = sorted(set(names) - set(WBC_CLASS_ORDER))
        if unknown:
            raise forms.ValidationError(f"Unknown class(es): {', '.join(unknown)}; use {', '.join(WBC_CLASS_ORDER)}.")
        if sorted(names) != sorted(WBC_CLASS_ORDER):
            raise forms.ValidationError("List each of the five classes exactly once, in the model's output order.")
        return names

    def normalization_spec(self) -> dict:
        if self.cleaned_data["normalization"] == "scale01":
            return {"method": "scale01"}
        return zscore_spec(self.cleaned_data.get("norm_mean") or "", self.cleaned_data.get("norm_std") or "")

    def clean(self):
        cleaned = super().clean()
        if "normalization" in cleaned:
            cleaned["normalization_spec"] = self.normalization_spec()
        return cleaned
