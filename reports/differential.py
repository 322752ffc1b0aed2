"""The differential count of a batch: per-class tallies by effective class (the technologist's verified class, else
the AI's), non-WBC categories per 100 WBC, reference-range flags, absolute counts, the count target, the AI-vs-
technologist agreement, review flags, the out-of-scope share, failures and timing."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from accounts.models import CellCategory, LabSettings
from wbc_ml.review_flag import needs_review

from .models import Batch, BatchItem

REPORT_COLUMNS = ["filename", "predicted_class", "confidence", "needs_review", "timestamp", "processing_ms"]
REVIEW_COLUMNS = ["verified_class", "verified_by", "verified_at", "model_version", "is_outlier", "model_sha256"]
SUMMARY_COLUMNS = ["class", "count", "percent", "flag", "reference_range", "absolute_1e9_per_l", "per_100_wbc"]
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
OUT_OF_SCOPE_WARNING = (
    "These images are unlike the model's training data; the numbers are unreliable and every cell must be "
    "verified (or use a model adapted to this laboratory)."
)


def verification_of(item: BatchItem):
    """The item's CellVerification, or None (no query when it was select_related)."""
    return getattr(item, "verification", None)


def effective_class(item: BatchItem) -> str | None:
    """The technologist's class when verified, else the AI's; None for an unclassified item."""
    verification = verification_of(item)
    if verification is not None:
        return verification.verified_class
    return item.prediction.predicted_class if item.prediction is not None else None


class CellRow(NamedTuple):
    """One item of a slide as plain values: what the differential and the review page read (no model instances)."""

    id: int
    position: int
    filename: str
    status: str
    thumbnail: str
    prediction_uid: uuid.UUID | None
    predicted_class: str | None
    confidence: float | None
    is_outlier: bool | None
    processing_ms: float | None
    verified_class: str | None
    verified_by: str | None
    verified_at: datetime | None

    @property
    def classified(self) -> bool:
        return self.prediction_uid is not None

    @property
    def effective_class(self) -> str | None:
        return self.verified_class if self.verified_class is not None else self.predicted_class

    def flagged(self, threshold: float) -> bool:
        return self.classified and needs_review(self.confidence, self.is_outlier, threshold)


CELL_FIELDS = (
    "id",
    "position",
    "original_filename",
    "status",
    "thumbnail",
    "prediction__uid",
    "prediction__predicted_class",
    "prediction__confidence",
    "prediction__is_outlier",
    "prediction__processing_ms",
    "verification__verified_class",
    "verification__verified_by__username",
    "verification__verified_at",
)


def cell_rows(batch: Batch) -> list[CellRow]:
    """Every item of the slide as a CellRow, in order, from one query."""
    return [CellRow(*values) for values in batch.items.order_by("position", "id").values_list(*CELL_FIELDS)]


def row_of(item: BatchItem) -> CellRow:
    """The CellRow of an item loaded as a model (with its prediction and verification select_related)."""
    p, v = item.prediction, verification_of(item)
    return CellRow(
        item.pk,
        item.position,
        item.original_filename,
        item.status,
        item.thumbnail.name if item.thumbnail else "",
        p.uid if p else None,
        p.predicted_class if p else None,
        p.confidence if p else None,
        p.is_outlier if p else None,
        p.processing_ms if p else None,
        v.verified_class if v else None,
        v.verified_by.get_username() if v else None,
        v.verified_at if v else None,
    )


def range_flag(value: float | None, bounds) -> str:
    """'L' below, 'H' above, 'N' inside the reference range (both edges inclusive); '' without a range or value."""
    if value is None or not bounds:
        return ""
    low, high = float(bounds[0]), float(bounds[1])
    return "L" if value < low else "H" if value > high else "N"


@dataclass
class ClassTally:
    name: str
    count: int = 0
    percent: float = 0.0  # fraction of the counted WBC, 0–1
    low: float | None = None
    high: float | None = None
    flag: str = ""  # H / L / N against the lab's reference range ("" without one)
    absolute: float | None = None  # ×10⁹/L, when the batch has a total WBC count

    @property
    def shown_percent(self) -> float:
        """The percentage as printed (one decimal); the flag is judged on this value so the two never disagree."""
        return round(self.percent * 100, 1)


@dataclass
class CategoryTally:
    key: str
    label: str
    count: int = 0
    per_100_wbc: float | None = None


@dataclass
class ClassAgreement:
    name: str
    verified: int = 0
    agreeing: int = 0

    @property
    def share(self) -> float | None:
        return self.agreeing / self.verified if self.verified else None


@dataclass
class Differential:
    batch: Batch
    threshold: float
    class_names: list[str]
    items: list[BatchItem]
    tallies: list[ClassTally] = field(default_factory=list)
    non_wbc: list[CategoryTally] = field(default_factory=list)
    classified: int = 0
    wbc_counted: int = 0
    count_target: int = 100
    needs_review: int = 0
    flagged_at_slide_threshold: int = 0
    to_review: int = 0
    verified: int = 0
    agreement: list[ClassAgreement] = field(default_factory=list)
    out_of_scope_limit: float = 0.30
    failed: list[BatchItem] = field(default_factory=list)  # the failed items (when built from model items)
    failed_count: int = 0
    pending: int = 0
    total_ms: float = 0.0
    total: int = 0

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.classified if self.classified else 0.0

    @property
    def unverified(self) -> int:
        return self.classified - self.verified

    @property
    def short(self) -> bool:
        return self.wbc_counted < self.count_target

    @property
    def counts(self) -> dict:
        return {"counted": self.wbc_counted, "target": self.count_target, "short": self.short}

    @property
    def agreement_overall(self) -> ClassAgreement:
        return ClassAgreement("all", sum(a.verified for a in self.agreement), sum(a.agreeing for a in self.agreement))

    @property
    def out_of_scope_share(self) -> float:
        return self.flagged_at_slide_threshold / self.classified if self.classified else 0.0

    @property
    def out_of_scope(self) -> dict:
        share = self.out_of_scope_share
        return {"share": round(share, 4), "limit": self.out_of_scope_limit, "warn": share > self.out_of_scope_limit}

    @property
    def out_of_scope_warning(self) -> str:
        return OUT_OF_SCOPE_WARNING if self.out_of_scope["warn"] else ""


def review_items(batch: Batch):
    """The batch's items with everything the differential and the review page read, in one query."""
    return batch.items.select_related("prediction", "verification", "verification__verified_by").order_by(
        "position", "id"
    )


def lab_categories(laboratory_id: int) -> list[CellCategory]:
    """Every category of the lab, inactive ones too (old verifications keep their label); one query once the lab
    has its defaults."""
    categories = list(CellCategory.objects.filter(laboratory_id=laboratory_id))
    if not categories:
        CellCategory.for_lab(laboratory_id)  # makes the defaults
        categories = list(CellCategory.objects.filter(laboratory_id=laboratory_id))
    return categories


def category_labels(laboratory_id: int, categories: list[CellCategory] | None = None) -> dict[str, str]:
    """key -> label of every category of the lab."""
    return {c.key: c.label for c in (lab_categories(laboratory_id) if categories is None else categories)}


def build_differential(
    batch: Batch,
    threshold: float,
    *,
    lab_settings: LabSettings | None = None,
    categories: dict[str, str] | None = None,
    items: list[BatchItem] | None = None,
    rows: list[CellRow] | None = None,
) -> Differential:
    """The differential of ``batch`` at ``threshold``. Give ``rows`` (from :func:`cell_rows`) when the items
    themselves are not needed (the review page): no model instances are made, which is several times faster."""
    if rows is None:
        items = list(review_items(batch)) if items is None else items
        rows = [row_of(item) for item in items]
    lab_settings = lab_settings or LabSettings.for_lab(batch.laboratory_id)
    categories = category_labels(batch.laboratory_id) if categories is None else categories
    class_names = list(batch.model.class_names)
    report = Differential(batch, threshold, class_names, items or [], total=len(rows))
    report.failed = [item for item in report.items if item.status == BatchItem.Status.FAILED and not item.prediction]
    report.count_target, report.out_of_scope_limit = lab_settings.count_target, lab_settings.out_of_scope_limit
    counts = dict.fromkeys(class_names, 0)
    other = dict.fromkeys(categories, 0)
    agreement = {name: ClassAgreement(name) for name in class_names}
    for row in rows:
        if not row.classified:
            if row.status == BatchItem.Status.FAILED:
                report.failed_count += 1
            else:
                report.pending += 1
            continue
        report.classified += 1
        report.total_ms += row.processing_ms
        report.needs_review += row.flagged(threshold)
        flagged = row.flagged(batch.threshold)
        report.flagged_at_slide_threshold += flagged
        if row.verified_class is not None:
            report.verified += 1
            tally = agreement.setdefault(row.predicted_class, ClassAgreement(row.predicted_class))
            tally.verified += 1
            tally.agreeing += row.verified_class == row.predicted_class
        elif flagged:
            report.to_review += 1
        name = row.effective_class
        if name in counts:
            counts[name] += 1
        else:
            other[name] = other.get(name, 0) + 1
    report.wbc_counted = sum(counts.values())
    report.tallies = [
        _tally(name, count, report.wbc_counted, lab_settings, batch.wbc_count) for name, count in counts.items()
    ]
    report.non_wbc = [
        CategoryTally(
            key,
            categories.get(key, key),
            count,
            round(count * 100 / report.wbc_counted, 1) if report.wbc_counted else None,
        )
        for key, count in other.items()
        if count
    ]
    report.agreement = list(agreement.values())
    return report


def _tally(name: str, count: int, counted: int, lab_settings: LabSettings, wbc_count: float | None) -> ClassTally:
    tally = ClassTally(name, count, count / counted if counted else 0.0)
    bounds = (lab_settings.reference_ranges or {}).get(name)
    if bounds:
        tally.low, tally.high = float(bounds[0]), float(bounds[1])
    if counted:
        tally.flag = range_flag(tally.shown_percent, bounds)
        if wbc_count is not None:
            tally.absolute = round(tally.shown_percent / 100 * wbc_count, 2)
    return tally


def excel_safe(value: str) -> str:
    """Neutralise spreadsheet formulas in text cells (CSV injection, OWASP)."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def report_rows(report: Differential) -> Iterator[list[str]]:
    yield REPORT_COLUMNS + [f"prob_{name}" for name in report.class_names] + REVIEW_COLUMNS
    for item in report.items:
        p = item.prediction
        if p is None:
            continue
        verification = verification_of(item)
        yield [
            excel_safe(item.original_filename),
            p.predicted_class,
            f"{p.confidence:.4f}",
            "yes" if p.needs_review(report.threshold) else "no",
            p.created_at.isoformat(timespec="seconds"),
            f"{p.processing_ms:.1f}",
            *(f"{v:.4f}" for v in p.probabilities),
            verification.verified_class if verification else "",
            excel_safe(verification.verified_by.get_username()) if verification else "",
            verification.verified_at.isoformat(timespec="seconds") if verification else "",
            excel_safe(p.model_version),
            "yes" if p.is_outlier else "no",
            p.model_sha256,
        ]


def _share(part: int, whole: int) -> str:
    return f"{part / whole * 100:.1f}" if whole else "0.0"


def summary_rows(report: Differential) -> Iterator[list[str]]:
    yield SUMMARY_COLUMNS
    for t in report.tallies:
        reference = f"{t.low:g}-{t.high:g}" if t.low is not None else ""
        absolute = "" if t.absolute is None else f"{t.absolute:.2f}"
        yield [t.name, str(t.count), f"{t.shown_percent:.1f}", t.flag, reference, absolute, ""]
    for c in report.non_wbc:
        yield [c.key, str(c.count), "", "", "", "", "" if c.per_100_wbc is None else f"{c.per_100_wbc:.1f}"]
    blank = [""] * (len(SUMMARY_COLUMNS) - 3)
    yield ["total_classified", str(report.classified), "100.0" if report.classified else "0.0", *blank]
    yield ["wbc_counted", str(report.wbc_counted), f"of target {report.count_target}", *blank]
    yield ["needs_review", str(report.needs_review), _share(report.needs_review, report.classified), *blank]
    yield ["to_review", str(report.to_review), _share(report.to_review, report.classified), *blank]
    overall = report.agreement_overall
    yield ["ai_agreement", f"{overall.agreeing}/{overall.verified}", _share(overall.agreeing, overall.verified), *blank]
    yield ["failed", str(report.failed_count), "", *blank]


def to_csv(rows: Iterator[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows(rows)
    return buffer.getvalue()
