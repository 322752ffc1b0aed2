"""A slide's audit trail in words: who changed which cell or report version, when, and from what to what.

The rows come from the historical tables the ``audit`` app keeps (django-simple-history, reached through each
model's ``history`` manager); this module only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth import get_user_model

from .models import Batch, CellVerification, ReportVersion

REPORT_FIELDS = [  # the report-version fields a reader of the trail cares about, with their names in words
    ("amendment_reason", "reason"),
    ("signed_by_id", "signed by"),
    ("signed_at", "signed at"),
    ("countersigned_by_id", "countersigned by"),
    ("countersigned_at", "countersigned at"),
]


@dataclass
class HistoryEntry:
    when: datetime
    user: str
    action: str
    subject: str
    before: str
    after: str

    def row(self) -> list[str]:
        return [self.user, self.action, self.subject, self.before, self.after]


def _names(user_ids: set) -> dict:
    users = get_user_model().objects.filter(pk__in={u for u in user_ids if u is not None})
    return {u.pk: u.get_username() for u in users}


def _cell_entries(batch: Batch, names: dict) -> list[HistoryEntry]:
    items = {
        item.pk: (item.original_filename, item.prediction.predicted_class if item.prediction else "")
        for item in batch.items.select_related("prediction").only(
            "pk", "original_filename", "prediction__predicted_class"
        )
    }
    previous: dict[int, str] = {}
    entries = []
    for record in CellVerification.history.filter(item__batch=batch).order_by("history_date", "history_id"):
        filename, ai_class = items.get(record.item_id, (f"item {record.item_id}", ""))
        before = previous.get(record.id) or f"AI: {ai_class}"
        if record.history_type == "-":
            after, action = f"AI: {ai_class}", record.history_change_reason or "verification removed"
            previous.pop(record.id, None)
        else:
            after, action = record.verified_class, record.history_change_reason or "reclassified"
            previous[record.id] = record.verified_class
        entries.append(
            HistoryEntry(
                record.history_date, names.get(record.history_user_id, ""), action, f"cell {filename}", before, after
            )
        )
    return entries


def _shown(value, names: dict, field: str) -> str:
    if value is None or value == "":
        return "—"
    if field.endswith("_by_id"):
        return names.get(value, str(value))
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _report_entries(batch: Batch, names: dict) -> list[HistoryEntry]:
    previous: dict[int, object] = {}
    entries = []
    for record in ReportVersion.history.filter(batch=batch).order_by("history_date", "history_id"):
        before_record = previous.get(record.id)
        changed = [
            (field, label)
            for field, label in REPORT_FIELDS
            if before_record is None or getattr(before_record, field) != getattr(record, field)
        ]
        changed = [
            (f, label) for f, label in changed if before_record is not None or getattr(record, f) not in (None, "")
        ]
        before = (
            "; ".join(f"{label}: {_shown(getattr(before_record, f), names, f)}" for f, label in changed)
            if before_record is not None
            else "—"
        )
        after = "; ".join(f"{label}: {_shown(getattr(record, f), names, f)}" for f, label in changed)
        action = (
            record.history_change_reason
            or {"+": "version opened", "~": "version changed", "-": "removed"}[record.history_type]
        )
        entries.append(
            HistoryEntry(
                record.history_date,
                names.get(record.history_user_id, ""),
                action,
                f"report v{record.number}",
                before,
                after,
            )
        )
        previous[record.id] = record
    return entries


def history_entries(batch: Batch) -> list[HistoryEntry]:
    """Every audited change of this slide (cells and report versions), oldest first."""
    user_ids = set(CellVerification.history.filter(item__batch=batch).values_list("history_user_id", flat=True))
    user_ids |= set(ReportVersion.history.filter(batch=batch).values_list("history_user_id", flat=True))
    user_ids |= set(ReportVersion.history.filter(batch=batch).values_list("signed_by_id", flat=True))
    user_ids |= set(ReportVersion.history.filter(batch=batch).values_list("countersigned_by_id", flat=True))
    names = _names(user_ids)
    entries = _cell_entries(batch, names) + _report_entries(batch, names)
    return sorted(entries, key=lambda e: e.when)
