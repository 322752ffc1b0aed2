"""docs/deploy.md cannot fall behind: every environment variable the settings and scripts/run read is in its table.

The names are found by reading the code itself: in ``wbcsite/settings.py`` every call of an ``env_*`` helper or
``os.environ.get``/``os.getenv`` and every ``os.environ[...]`` with a literal name (parsed with ``ast``, so a new
helper named ``env_something`` is covered too); in ``scripts/run`` and ``scripts/venv.sh`` every ``${NAME:-…}``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "docs" / "deploy.md"
SHELL_SCRIPTS = (REPO / "scripts" / "run", REPO / "scripts" / "venv.sh")
TABLE_ROW = re.compile(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", re.MULTILINE)
SHELL_DEFAULT = re.compile(r"\$\{([A-Z][A-Z0-9_]*):?[-+=?]")


def _literal_name(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def settings_env_names() -> set[str]:
    """Names read from the environment by wbcsite/settings.py, from its syntax tree."""
    names = set()
    for node in ast.walk(ast.parse((REPO / "wbcsite" / "settings.py").read_text())):
        if isinstance(node, ast.Call) and node.args:
            function = ast.unparse(node.func)
            if function.startswith("env_") or function in ("os.environ.get", "os.getenv"):
                names.add(_literal_name(node.args[0]))
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            names.add(_literal_name(node.slice))
    return names - {None}


def script_env_names() -> set[str]:
    return {name for script in SHELL_SCRIPTS for name in SHELL_DEFAULT.findall(script.read_text())}


def documented_names() -> set[str]:
    return set(TABLE_ROW.findall(DEPLOY.read_text()))


def test_the_parsers_find_what_is_known_to_be_there():
    """Guards the guard: a parser that finds nothing would make the next test pass for nothing."""
    assert {
        "DATABASE_URL",
        "SECRET_KEY",
        "WBC_ENV",
        "REDIS_URL",
        "WBC_METRICS_ALLOWED_ADDRESSES",
    } <= settings_env_names()
    assert {"WBC_PORT", "WBC_TLS_CERT", "WEB_CONCURRENCY", "PYTHON"} <= script_env_names()
    assert len(settings_env_names()) > 40


def test_every_environment_variable_of_the_settings_is_in_the_deploy_table():
    missing = settings_env_names() - documented_names()
    assert not missing, f"add these to the table in docs/deploy.md: {sorted(missing)}"


def test_every_environment_variable_of_scripts_run_is_in_the_deploy_table():
    missing = script_env_names() - documented_names()
    assert not missing, f"add these to the table in docs/deploy.md: {sorted(missing)}"


def test_the_guide_covers_what_operators_need():
    text = DEPLOY.read_text()
    for needle in (
        "/healthz",
        "/readyz",
        "/metrics",
        "scrape_configs",
        "run_worker",
        "deliver_lis",
        "gunicorn.conf.py",
        "[Service]",
        "migrate",
        "pg_dump",
        "pg_restore",
        ".backup",
        "aws s3 sync",
        "rclone",
        "Restore check",
    ):
        assert needle in text, needle
    assert "docs/deploy.md" in (REPO / "README.md").read_text()
