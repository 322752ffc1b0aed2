"""Log-in lock-out per address across usernames, on top of django-axes' lock-out per username and address.

Axes counts failures per lock-out parameter set but has one limit for all of them, and a shared lab address
should be allowed more failures than one user. :class:`AddressLimitHandler` (``AXES_HANDLER``) keeps axes'
rule (``AXES_FAILURE_LIMIT`` failures of one username from one address) and adds a second, higher one:
``WBC_LOGIN_ADDRESS_FAILURE_LIMIT`` failures from one address, whatever the usernames, within the same cool-off,
counted from axes' own failure records. A locked address gets axes' lock-out page (429) like a locked user.
"""

from __future__ import annotations

from axes.attempts import get_cool_off_threshold
from axes.handlers.database import AxesDatabaseHandler
from axes.models import AccessAttempt
from django.conf import settings
from django.db.models import Sum


class AddressLimitHandler(AxesDatabaseHandler):
    def is_locked(self, request, credentials: dict | None = None) -> bool:
        return super().is_locked(request, credentials) or self.address_failures(request) >= (
            settings.WBC_LOGIN_ADDRESS_FAILURE_LIMIT
        )

    def user_login_failed(self, sender, credentials: dict, request=None, **kwargs) -> None:
        """Record the failure (axes), then answer with the lock-out page once the address reached its limit."""
        super().user_login_failed(sender, credentials, request, **kwargs)
        if request is not None and self.address_failures(request) >= settings.WBC_LOGIN_ADDRESS_FAILURE_LIMIT:
            request.axes_locked_out = True

    @staticmethod
    def address_failures(request) -> int:
        """Failures from the request's address within the cool-off, over every username."""
        attempts = AccessAttempt.objects.filter(ip_address=request.axes_ip_address)
        if settings.AXES_COOLOFF_TIME is not None:
            attempts = attempts.filter(attempt_time__gte=get_cool_off_threshold(request))
        return attempts.aggregate(n=Sum("failures_since_start"))["n"] or 0
