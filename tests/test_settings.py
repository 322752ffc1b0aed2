import os
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from tests.conftest import REPO
from wbcsite import settings as site_settings


def _manage(*args, **env):
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DJANGO_SETTINGS_MODULE", "DATABASE_URL", "DJANGO_ALLOW_ASYNC_UNSAFE"}
    }
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_check_deploy_is_clean_in_production_mode(tmp_path):
    result = _manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        WBC_ENV="production",
        SECRET_KEY="x" * 20 + "a-production-secret-with-enough-entropy-0123456789",
        ALLOWED_HOSTS="wbc.example.org",
        DATABASE_URL=f"sqlite:///{tmp_path / 'prod.sqlite3'}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_development_defaults_would_fail_deploy_checks(tmp_path):
    result = _manage("check", "--deploy", "--fail-level", "WARNING", DATABASE_URL=f"sqlite:///{tmp_path / 'd.sqlite3'}")
    assert result.returncode != 0  # proves the check above can fail


def test_debug_cannot_be_on_in_production(tmp_path):
    result = _manage(
        "check",
        WBC_ENV="production",
        DEBUG="1",
        SECRET_KEY="k" * 60,
        DATABASE_URL=f"sqlite:///{tmp_path / 'd.sqlite3'}",
    )
    assert result.returncode != 0 and "DEBUG must be off" in result.stderr


def test_database_url_selects_postgresql():
    import dj_database_url

    parsed = dj_database_url.parse("postgres://wbc@127.0.0.1:5432/test")
    assert parsed["ENGINE"] == "django.db.backends.postgresql" and parsed["NAME"] == "test"


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("yes", True), ("off", False), ("0", False)])
def test_env_bool(monkeypatch, raw, expected):
    monkeypatch.setenv("WBC_FLAG", raw)
    assert site_settings.env_bool("WBC_FLAG") is expected


def test_env_helpers_refuse_nonsense(monkeypatch):
    monkeypatch.setenv("WBC_FLAG", "maybe")
    monkeypatch.setenv("WBC_NUMBER", "twelve")
    with pytest.raises(ImproperlyConfigured):
        site_settings.env_bool("WBC_FLAG")
    with pytest.raises(ImproperlyConfigured):
        site_settings.env_int("WBC_NUMBER", 1)


def test_env_list(monkeypatch):
    monkeypatch.setenv("WBC_HOSTS", "a.example, b.example,,")
    assert site_settings.env_list("WBC_HOSTS", []) == ["a.example", "b.example"]


def test_media_goes_through_storages_and_s3_is_a_setting(tmp_path):
    code = "from django.conf import settings; print(settings.STORAGES['default']['BACKEND'])"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import django, os; os.environ['DJANGO_SETTINGS_MODULE']='wbcsite.settings'; django.setup(); {code}",
        ],
        cwd=REPO,
        env={**os.environ, "AWS_STORAGE_BUCKET_NAME": "lab-media", "DJANGO_SETTINGS_MODULE": "wbcsite.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "storages.backends.s3.S3Storage", result.stderr
