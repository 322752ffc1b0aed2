"""Forms of the LIS settings page: message settings, a destination (its token is write-only), code overrides."""

from __future__ import annotations

from django import forms

from .models import Destination, LisSettings
from .tokens import encrypt


class LisSettingsForm(forms.ModelForm):
    class Meta:
        model = LisSettings
        fields = [
            "sending_application",
            "sending_facility",
            "receiving_application",
            "receiving_facility",
            "local_coding_system",
            "send_ai_only",
        ]


class DestinationForm(forms.ModelForm):
    token = forms.CharField(
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="FHIR bearer token: stored encrypted and never shown again. Leave empty to keep the current one.",
    )
    clear_token = forms.BooleanField(required=False, label="Remove the stored token")

    class Meta:
        model = Destination
        fields = ["name", "kind", "is_active", "host", "port", "use_tls", "base_url", "token_env", "timeout_s"]

    def __init__(self, *args, laboratory=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.laboratory = laboratory

    def clean(self):
        data = super().clean()
        kind = data.get("kind")
        if kind == Destination.Kind.MLLP and (not data.get("host") or not data.get("port")):
            raise forms.ValidationError("An MLLP destination needs a host and a port.")
        if kind == Destination.Kind.FHIR and not data.get("base_url"):
            raise forms.ValidationError("A FHIR destination needs its base URL.")
        if data.get("token") and data.get("token_env"):
            raise forms.ValidationError("Give either a token or the name of an environment variable, not both.")
        name = data.get("name")
        taken = Destination.objects.filter(laboratory=self.laboratory, name=name).exclude(pk=self.instance.pk)
        if name and taken.exists():
            self.add_error("name", "Your laboratory already has a destination with this name.")
        return data

    def save(self, commit: bool = True) -> Destination:
        destination = super().save(commit=False)
        destination.laboratory = self.laboratory
        if self.cleaned_data.get("clear_token"):
            destination.token_encrypted = ""
        if self.cleaned_data.get("token"):
            destination.token_encrypted = encrypt(self.cleaned_data["token"])
        if destination.token_env:
            destination.token_encrypted = ""
        if commit:
            destination.save()
        return destination


class CodeOverrideForm(forms.Form):
    """One category's override: empty code = use the table."""

    code = forms.CharField(required=False, max_length=20)
    text = forms.CharField(required=False, max_length=120)
    system = forms.CharField(required=False, max_length=20, help_text='"LN" for LOINC, else a local system name')
