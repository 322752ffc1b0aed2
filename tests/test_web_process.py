"""A web process imports its views when it starts, not during its first request."""

from __future__ import annotations

import os

import pytest

from tests.conftest import python_output

SHOW = "import sys, {module}; print('reports.api' in sys.modules, 'django.contrib.admin.sites' in sys.modules)"


@pytest.mark.parametrize("module", ["wbcsite.wsgi", "wbcsite.asgi"])
def test_a_fresh_web_process_has_imported_the_views_before_its_first_request(module):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "wbcsite.settings"}
    assert python_output(SHOW.format(module=module), env).split()[-2:] == ["True", "True"]
