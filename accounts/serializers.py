"""API tokens in the API (the browser-session endpoints behind the tokens page)."""

from __future__ import annotations

from rest_framework import serializers

from .models import ApiToken


class ApiTokenSerializer(serializers.ModelSerializer):
    prefix = serializers.CharField(source="shown_prefix", read_only=True, help_text="how to recognise the key")
    is_active = serializers.BooleanField(read_only=True)

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "is_active", "created_at", "last_used_at", "revoked_at"]
        read_only_fields = ["id", "prefix", "is_active", "created_at", "last_used_at", "revoked_at"]
        extra_kwargs = {"name": {"help_text": "what the token is for, e.g. “LIS production”"}}


class NewApiTokenSerializer(ApiTokenSerializer):
    key = serializers.SerializerMethodField(help_text="the key: shown once, store it now")

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "key"]

    def get_key(self, obj) -> str:
        return self.context["key"]
