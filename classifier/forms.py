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
