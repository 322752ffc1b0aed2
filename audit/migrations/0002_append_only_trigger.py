"""Append-only on PostgreSQL: a statement trigger refuses every UPDATE and DELETE on the historical tables
(see audit.triggers; SQLite: nothing)."""

from django.db import migrations

from audit import triggers

TABLES = [
    "audit_historicalapitoken",
    "audit_historicalcellcategory",
    "audit_historicalcellverification",
    "audit_historicalclassifiermodel",
    "audit_historicallabsettings",
    "audit_historicalreportversion",
]


def install(apps, schema_editor):
    triggers.install(schema_editor, TABLES)


def remove(apps, schema_editor):
    triggers.remove(schema_editor, TABLES, drop_function=True)


class Migration(migrations.Migration):
    dependencies = [("audit", "0001_audit_trail")]

    operations = [migrations.RunPython(install, remove)]
