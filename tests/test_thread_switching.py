"""Web processes and the worker hand the GIL on sooner than CPython's 5 ms (WBC_GIL_SWITCH_US), so the threads that
write a batch's files or wait on the database are not held up by a thread busy in Python."""

from __future__ import annotations

import os

import pytest

from tests.conftest import python_output

SHOW = "import sys, {module}; print(sys.getswitchinterval())"


def child_switch_interval(code: str, env: dict[str, str]) -> float:
    """The switch interval that a fresh Python process running ``code`` prints last."""
    return float(python_output(code, env).split()[-1])


def switch_interval_of(module: str, **env: str) -> float:
    """The switch interval of a fresh process once it has imported ``module`` (as a server would)."""
    environment = {key: value for key, value in os.environ.items() if key != "WBC_GIL_SWITCH_US"}
    environment.update(DJANGO_SETTINGS_MODULE="wbcsite.settings", **env)
    return child_switch_interval(SHOW.format(module=module), environment)


@pytest.mark.parametrize("module", ["wbcsite.wsgi", "wbcsite.asgi"])
def test_a_web_process_uses_half_a_millisecond_unless_configured(module):
    assert switch_interval_of(module) == pytest.approx(0.0005)
    assert switch_interval_of(module, WBC_GIL_SWITCH_US="2000") == pytest.approx(0.002)


def test_the_setting_has_a_floor_of_100_microseconds():
    assert switch_interval_of("wbcsite.wsgi", WBC_GIL_SWITCH_US="0") == pytest.approx(0.0001)


WORKER_CHILD = """
import io, os, sys
import django
django.setup()
from django.core.management import call_command

class ReadyLine(io.TextIOWrapper):
    def write(self, text):
        if text.startswith("worker ready"):  # the worker's first round is over: report and stop at once
            sys.__stdout__.write(f"{sys.getswitchinterval()}\\n")
            sys.__stdout__.flush()
            os._exit(0)
        return super().write(text)

sys.stdout = ReadyLine(io.BytesIO())
call_command("run_worker")
"""


@pytest.mark.django_db(transaction=True)
def test_the_running_worker_uses_the_setting(settings):
    from tests.conftest import test_database_url

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "wbcsite.settings",
        "DATABASE_URL": test_database_url(),
        "WBC_WORKER_WAKEUP_DIR": str(settings.WBC_WORKER_WAKEUP_DIR),
        "WBC_WORKER_NICE": "0",
        "WBC_GIL_SWITCH_US": "300",
    }
    assert child_switch_interval(WORKER_CHILD, env) == pytest.approx(0.0003)
