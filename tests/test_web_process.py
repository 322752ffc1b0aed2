"""A web process imports its views when it starts, not during its first request."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SHOW = "import sys, {module}; print('reports.api' in sys.modules, 'django.contrib.admin.sites' in sys.modules)"


@pytest.mark.parametrize("module", ["wbcsite.wsgi", "wbcsite.asgi"])
def test_a_fresh_web_process_has_imported_the_views_before_its_first_request(module):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "wbcsite.settings"}
    done = subprocess.run(
        [sys.executable, "-c", SHOW.format(module=module)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["True", "True"]
