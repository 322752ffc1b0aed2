"""Log-in lock-out: per username and address (5 failures), and per address across usernames (password spraying)."""

from __future__ import annotations

from django.urls import reverse

PASSWORD = "a-long-test-password"  # the personas' password (tests/conftest.py)
SPRAYER = "203.0.113.9"
OTHER = "198.51.100.4"


def _log_in(client, username: str, password: str, address: str):
    return client.post(reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=address)


def test_one_address_spraying_many_usernames_is_locked_out_while_others_still_log_in(client, technologist, settings):
    limit = settings.WBC_LOGIN_ADDRESS_FAILURE_LIMIT
    assert limit > settings.AXES_FAILURE_LIMIT  # a shared lab address may mistype more often than one user
    for n in range(limit - 1):  # one wrong password per username: the per-username limit never triggers
        assert _log_in(client, f"user{n}", "Winter2026!", SPRAYER).status_code == 200
    assert _log_in(client, "tech_a", PASSWORD, SPRAYER).status_code == 302  # just under the limit: still fine
    client.post(reverse("logout"))
    assert _log_in(client, "someone", "Winter2026!", SPRAYER).status_code == 429  # the limit-th failure locks

    locked = _log_in(client, "tech_a", PASSWORD, SPRAYER)  # even the right password, for any user
    assert locked.status_code == 429 and "Too many failed log-in attempts" in locked.text
    assert _log_in(client, "new-name", "Winter2026!", SPRAYER).status_code == 429

    assert _log_in(client, "tech_a", PASSWORD, OTHER).status_code == 302  # another address is not affected


def test_per_username_limit_still_applies_first(client, technologist, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        _log_in(client, "tech_a", "wrong", SPRAYER)
    assert _log_in(client, "tech_a", PASSWORD, SPRAYER).status_code == 429
    assert _log_in(client, "tech_a", PASSWORD, OTHER).status_code == 302
