"""FHIR bearer tokens at rest: encrypted with a key derived from SECRET_KEY (Fernet), or a reference to an
environment variable. Neither is ever shown back; pages only say whether a token is set."""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings

KEY_CONTEXT = b"wbc-platform lis.Destination.token v1"


class TokenUnavailable(RuntimeError):
    """The stored token cannot be read (SECRET_KEY changed, or the environment variable is not set)."""


def _fernets() -> list[Fernet]:
    secrets = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    return [
        Fernet(base64.urlsafe_b64encode(hashlib.sha256(KEY_CONTEXT + secret.encode()).digest())) for secret in secrets
    ]


def encrypt(token: str) -> str:
    return _fernets()[0].encrypt(token.encode()).decode()


def decrypt(ciphertext: str) -> str:
    for fernet in _fernets():
        try:
            return fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            continue
    raise TokenUnavailable("The stored FHIR token cannot be decrypted (was SECRET_KEY changed?); enter it again.")


def bearer_token(destination) -> str:
    """The token to send, or "" when the destination has none."""
    if destination.token_env:
        value = os.environ.get(destination.token_env, "")
        if not value:
            raise TokenUnavailable(f"The environment variable {destination.token_env} is not set.")
        return value
    return decrypt(destination.token_encrypted) if destination.token_encrypted else ""
