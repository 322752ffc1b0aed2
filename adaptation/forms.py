from django import forms

from classifier.forms import ModelChoiceField

from .cells import EVALUATION, SOURCE_LABELS, VERIFIED


class StartForm(forms.Form):
    """A base model, the lab's own labelled cells to learn from, and optionally a .zip with one folder per class."""

    base_model = ModelChoiceField(label="Base model")
    sources = forms.MultipleChoiceField(
        choices=[(source, SOURCE_LABELS[source].capitalize()) for source in (VERIFIED, EVALUATION)],
        widget=forms.CheckboxSelectMultiple,
        required=False,
        label="Labelled cells of your laboratory",
    )
    archive = forms.FileField(
        required=False,
        label="And/or a .zip with one folder per class",
        help_text="basophil/, eosinophil/, lymphocyte/, monocyte/, neutrophil/ with JPEG or PNG cells",
    )
    seed = forms.IntegerField(min_value=0, max_value=2**31 - 1, initial=0, help_text="which cells are held back")

    def __init__(self, *args, models_queryset=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["base_model"].queryset = models_queryset

    def clean(self):
        data = super().clean()
        if not data.get("sources") and not data.get("archive"):
            raise forms.ValidationError("Choose at least one source of labelled cells, or upload a .zip.")
        return data
