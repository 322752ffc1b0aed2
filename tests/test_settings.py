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


def test_a_sqlite_connection_outlives_the_request_and_is_in_wal_mode(tmp_path):
    """The end of a request (close_old_connections) keeps the connection, as on PostgreSQL: opening one per request
    cost ~1.5 ms of every API call."""
    code = (
        "from django.db import close_old_connections, connection as c; c.ensure_connection(); first = c.connection;"
        "close_old_connections(); c.ensure_connection();"
        "print(c.connection is first, c.cursor().execute('PRAGMA journal_mode').fetchone()[0])"
    )
    result = _manage("shell", "--verbosity", "0", "-c", code, DATABASE_URL=f"sqlite:///{tmp_path / 'd.sqlite3'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "wal"]


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


def test_a_local_media_file_is_written_under_the_name_given(settings, tmp_path):
    # Media names carry a uuid: no search for a free name (no existence check per file), as on S3.
    from django.core.files.base import ContentFile
    from django.core.files.storage import storages

    settings.MEDIA_ROOT = tmp_path
    media = storages.create_storage(settings.STORAGES["default"])
    assert media.save("batches/a.jpg", ContentFile(b"first")) == "batches/a.jpg"
    assert media.save("batches/a.jpg", ContentFile(b"second")) == "batches/a.jpg"
    assert (tmp_path / "batches" / "a.jpg").read_bytes() == b"second"


def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    """A key made up per host would make every host's token digests (and sessions) differ."""
    key_file = tmp_path / "secret_key"
    env = {
        "WBC_ENV": "production",
        "ALLOWED_HOSTS": "wbc.example.org",
        "SECRET_KEY_FILE": str(key_file),
        "SECRET_KEY": "",
    }
    result = _manage("check", DATABASE_URL=f"sqlite:///{tmp_path / 'p.sqlite3'}", **env)
    assert result.returncode != 0
    assert "SECRET_KEY must be set when WBC_ENV=production" in result.stderr
    assert not key_file.exists()


def test_development_without_a_secret_key_makes_one_and_keeps_it(tmp_path):
    key_file = tmp_path / "secret_key"
    for _run in range(2):
        result = _manage(
            "check", SECRET_KEY="", SECRET_KEY_FILE=str(key_file), DATABASE_URL=f"sqlite:///{tmp_path / 'd.sqlite3'}"
        )
        assert result.returncode == 0, result.stderr
    assert len(key_file.read_text()) >= 50 and oct(key_file.stat().st_mode & 0o777) == "0o600"
