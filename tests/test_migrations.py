"""Migrations: a brand-new database migrates from empty (SQLite and PostgreSQL), and the models match them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import unavailable

REPO = Path(__file__).resolve().parent.parent
POSTGRES = ("127.0.0.1", 5432)


def manage(*args: str, database_url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": database_url, "DJANGO_SETTINGS_MODULE": "wbcsite.settings"}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def migrate_from_empty(database_url: str) -> None:
    result = manage("migrate", "--noinput", database_url=database_url)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = manage("showmigrations", "--plan", database_url=database_url)
    assert shown.returncode == 0, shown.stderr[-2000:]
    plan = shown.stdout.splitlines()
    assert plan and all(line.startswith("[X]") for line in plan), "every migration is applied"
    for app in ("accounts", "classifier", "reports"):
        assert any(f" {app}.0001_initial" in line for line in plan)


def postgres_available() -> bool:
    try:
        socket.create_connection(POSTGRES, 1).close()
    except OSError:
        return False
    return True


def test_models_and_migrations_agree(tmp_path):
    result = manage("makemigrations", "--check", "--dry-run", database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_migrate_from_an_empty_sqlite_database(tmp_path):
    migrate_from_empty(f"sqlite:///{tmp_path / 'empty.sqlite3'}")


def test_migrate_from_an_empty_postgresql_database():
    import psycopg

    if not postgres_available():
        unavailable("no PostgreSQL on 127.0.0.1:5432")

    name = f"wbc_migrate_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        migrate_from_empty(f"postgres://postgres@127.0.0.1:5432/{name}")
    finally:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
