"""API authentication, permissions and throttles.

* :class:`ApiTokenAuthentication` reads ``Authorization: Token <key>`` (``Bearer <key>`` too) and finds the
  :class:`~classifier.models.ApiToken` by its prefix, comparing an HMAC of the key in constant time. It is
  listed before DRF's session authentication, so a request without credentials is a 401 with
  ``WWW-Authenticate: Token``; the browser (Swagger UI) uses its session, with CSRF enforced as DRF does.
* :class:`IsLabMember`: every endpoint needs an authenticated user who belongs to a laboratory.
* :class:`ApiRateThrottle` / :class:`SubmitRateThrottle`: per token, else per user (sessions). Rates come from
  ``settings.WBC_API_RATE`` and ``settings.WBC_API_SUBMIT_RATE`` at request time (so tests can change them),
  and counted in fixed windows with an atomic counter (:mod:`accounts.counter_cache`) in the ``api_throttle``
  cache (the database by default, Redis when ``REDIS_URL`` is set), so parallel requests cannot slip past.
"""

from __future__ import annotations

import re

from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions, permissions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.throttling import SimpleRateThrottle

from .counter_cache import count_in_window
from .models import ApiToken

KEYWORDS = (b"token", b"bearer")
RATE_PATTERN = re.compile(r"^\d+/(s|sec|second|m|min|minute|h|hour|d|day)$")
THROTTLE_CACHE = "api_throttle"


class ApiTokenAuthentication(BaseAuthentication):
    keyword = "Token"

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() not in KEYWORDS:
            return None  # no token: let session authentication try
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Invalid Authorization header: use “Token <key>” (or “Bearer <key>”) with the key and no spaces."
            )
        try:
            key = parts[1].decode("ascii")
        except UnicodeError:
            raise exceptions.AuthenticationFailed(
                "Invalid token: the key contains characters it cannot have."
            ) from None
        token = ApiToken.find(key)
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked token.")
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("The token's user account is disabled.")
        token.touch()
        return token.user, token

    def authenticate_header(self, request) -> str:
        return f'{self.keyword} realm="api"'


class ApiTokenScheme(OpenApiAuthenticationExtension):
    """The token in the OpenAPI schema (Swagger UI's "Authorize" sends it as a Bearer token)."""

    target_class = ApiTokenAuthentication
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A key from /account/tokens/, sent as `Authorization: Token <key>` (or `Bearer <key>`).",
        }


class IsLabMember(permissions.BasePermission):
    """Authenticated, and a member of a laboratory (every object the API returns is that lab's).

    An anonymous request fails here, and DRF turns that into a 401 (not authenticated).
    """

    message = "Your account is not assigned to a laboratory yet; ask an administrator to set it."

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.laboratory_id is not None)


class CanClassify(permissions.BasePermission):
    """The same permission the classify and batch pages need."""

    message = "Your role may not classify images (the permission “add prediction” is missing)."

    def has_permission(self, request, view) -> bool:
        return request.user.has_perm("classifier.add_prediction")


class ApiRateThrottle(SimpleRateThrottle):
    """Every API request: ``WBC_API_RATE`` per token (per user for a browser session)."""

    scope = "api"
    setting = "WBC_API_RATE"

    def __init__(self):
        self.cache = caches[THROTTLE_CACHE]
        super().__init__()

    def get_rate(self) -> str | None:
        rate = (getattr(settings, self.setting, None) or "").strip()
        if not rate:
            return None  # no limit
        if not RATE_PATTERN.match(rate):
            raise ImproperlyConfigured(f"{self.setting}={rate!r}: use <number>/<second|minute|hour|day>, e.g. 120/min")
        return rate

    def allow_request(self, request, view) -> bool:
        """A fixed window per ``duration``: add-then-increment in the cache is one atomic count per request.

        (DRF's own throttle reads the history and writes it back, which parallel requests interleave.)
        """
        if self.rate is None:
            return True
        self.key = self.get_cache_key(request, view)
        if self.key is None:
            return True
        counted = count_in_window(self.cache, self.key, self.duration, self.timer())
        self.retry_after = counted.retry_after
        return counted.count <= self.num_requests

    def wait(self) -> float:
        return self.retry_after

    def get_cache_key(self, request, view) -> str:
        if isinstance(request.auth, ApiToken):
            ident = f"token-{request.auth.pk}"
        elif request.user and request.user.is_authenticated:
            ident = f"user-{request.user.pk}"
        else:
            ident = f"addr-{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}


class SubmitRateThrottle(ApiRateThrottle):
    """Work that runs the model or stores images (classify, batch submit, labels): ``WBC_API_SUBMIT_RATE``."""

    scope = "api-submit"
    setting = "WBC_API_SUBMIT_RATE"
