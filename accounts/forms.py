"""The laboratory settings form: how slides are counted, reviewed and signed, and the lab's cell categories."""

from __future__ import annotations

from django import forms
from django.core.exceptions import ValidationError

from wbc_ml.datasets import WBC_CLASSES

from .models import CellCategory, LabSettings

RESERVED_HOTKEYS = {str(i + 1) for i in range(len(WBC_CLASSES))}  # 1–5 are the five WBC classes


class LabSettingsForm(forms.ModelForm):
    """The settings row plus one low/high pair per WBC class (the reference ranges, percent of WBC)."""

    class Meta:
        model = LabSettings
        fields = ["count_target", "two_person_signoff", "require_all_verified", "out_of_scope_limit"]
        labels = {
            "count_target": "Cells to count per slide",
            "two_person_signoff": "Two-person sign-off (a Supervisor countersigns)",
            "require_all_verified": "Sign only when every cell is verified",
            "out_of_scope_limit": "Out-of-scope warning above this share of flagged cells (0–1)",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ranges = self.instance.reference_ranges or {}
        for name in WBC_CLASSES:
            low, high = (ranges.get(name) or [None, None])[:2]
            for bound, value in (("low", low), ("high", high)):
                self.fields[f"{name}_{bound}"] = forms.FloatField(
                    min_value=0, max_value=100, initial=value, label=f"{name.capitalize()} {bound} (%)"
                )

    def range_fields(self) -> list[tuple[str, forms.BoundField, forms.BoundField]]:
        return [(name, self[f"{name}_low"], self[f"{name}_high"]) for name in WBC_CLASSES]

    def clean(self):
        data = super().clean()
        for name in WBC_CLASSES:
            low, high = data.get(f"{name}_low"), data.get(f"{name}_high")
            if low is not None and high is not None and low > high:
                self.add_error(f"{name}_high", f"The {name} range ends below its start.")
        return data

    def save(self, commit: bool = True) -> LabSettings:
        settings_row = super().save(commit=False)
        settings_row.reference_ranges = {
            name: [self.cleaned_data[f"{name}_low"], self.cleaned_data[f"{name}_high"]] for name in WBC_CLASSES
        }
        if commit:
            settings_row.save()
        return settings_row


class CellCategoryForm(forms.ModelForm):
    class Meta:
        model = CellCategory
        fields = ["key", "label", "hotkey", "is_active", "position"]

    def clean_hotkey(self) -> str:
        hotkey = self.cleaned_data.get("hotkey", "")
        if hotkey in RESERVED_HOTKEYS:
            raise ValidationError("Keys 1–5 are the five white-cell classes.")
        return hotkey


class BaseCategoryFormSet(forms.BaseModelFormSet):
    def __init__(self, *args, laboratory=None, **kwargs):
        self.laboratory = laboratory
        super().__init__(*args, **kwargs)

    def clean(self):
        super().clean()
        keys, hotkeys = set(), set()
        for form in self.forms:
            if not form.has_changed() and not form.instance.pk:
                continue
            key, hotkey = form.cleaned_data.get("key"), form.cleaned_data.get("hotkey")
            if key in keys or key in WBC_CLASSES:
                form.add_error("key", "Each category needs its own key (not a white-cell class).")
            if hotkey and hotkey in hotkeys:
                form.add_error("hotkey", "Two categories cannot share a key.")
            keys.add(key)
            hotkeys.add(hotkey)


CategoryFormSet = forms.modelformset_factory(
    CellCategory, form=CellCategoryForm, formset=BaseCategoryFormSet, extra=1, can_delete=False
)
