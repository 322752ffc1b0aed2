"""Append-only on PostgreSQL: a statement trigger refuses every UPDATE and DELETE on the historical tables, even one
that matches no row. SQLite gets nothing (the admin and the app never write to them anyway); TRUNCATE stays
possible for test-database flushes. Used by the audit migrations."""

from __future__ import annotations

FUNCTION = """
CREATE OR REPLACE FUNCTION audit_refuse_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
"""


def install(schema_editor, tables: list[str]) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(FUNCTION, params=None)  # no placeholders: the % are PL/pgSQL format marks
    for table in tables:
        schema_editor.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();"
        )


def remove(schema_editor, tables: list[str], *, drop_function: bool) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in tables:
        schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table};")
    if drop_function:
        schema_editor.execute("DROP FUNCTION IF EXISTS audit_refuse_change();")
