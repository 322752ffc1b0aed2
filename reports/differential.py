"""The differential count of a batch: per-class tallies, review flags, failures and timing."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field

from .models import Batch, BatchItem

REPORT_COLUMNS = ["filename", "predicted_class", "confidence", "needs_review", "timestamp", "processing_ms"]
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


@dataclass
class ClassTally:
    name: str
    count: int = 0
    percent: float = 0.0


@dataclass
class Differential:
    batch: Batch
    threshold: float
    class_names: list[str]
    items: list[BatchItem]
    tallies: list[ClassTally] = field(default_factory=list)
    classified: int = 0
    needs_review: int = 0
    failed: list[BatchItem] = field(default_factory=list)
    pending: int = 0
    total_ms: float = 0.0

    @property
    def total(self) -> int:
        return len(self.items)

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.classified if self.classified else 0.0


def build_differential(batch: Batch, threshold: float) -> Differential:
    items = list(batch.items.select_related("prediction").order_by("position", "id"))
    class_names = list(batch.model.class_names)
    report = Differential(batch, threshold, class_names, items)
    counts = dict.fromkeys(class_names, 0)
    for item in items:
        prediction = item.prediction
        if prediction is not None:
            report.classified += 1
            counts[prediction.predicted_class] = counts.get(prediction.predicted_class, 0) + 1
            report.total_ms += prediction.processing_ms
            report.needs_review += prediction.needs_review(threshold)
        elif item.status == BatchItem.Status.FAILED:
            report.failed.append(item)
        else:
            report.pending += 1
    report.tallies = [
        ClassTally(name, count, count / report.classified if report.classified else 0.0)
        for name, count in counts.items()
    ]
    return report


def excel_safe(value: str) -> str:
    """Neutralise spreadsheet formulas in text cells (CSV injection, OWASP)."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def report_rows(report: Differential) -> Iterator[list[str]]:
    yield REPORT_COLUMNS + [f"prob_{name}" for name in report.class_names]
    for item in report.items:
        p = item.prediction
        if p is None:
            continue
        yield [
            excel_safe(item.original_filename),
            p.predicted_class,
            f"{p.confidence:.4f}",
            "yes" if p.needs_review(report.threshold) else "no",
            p.created_at.isoformat(timespec="seconds"),
            f"{p.processing_ms:.1f}",
            *(f"{v:.4f}" for v in p.probabilities),
        ]


def summary_rows(report: Differential) -> Iterator[list[str]]:
    yield ["class", "count", "percent"]
    for tally in report.tallies:
        yield [tally.name, str(tally.count), f"{tally.percent * 100:.1f}"]
    yield ["total_classified", str(report.classified), "100.0" if report.classified else "0.0"]
    yield [
        "needs_review",
        str(report.needs_review),
        f"{report.needs_review / report.classified * 100:.1f}" if report.classified else "0.0",
    ]
    yield ["failed", str(len(report.failed)), ""]


def to_csv(rows: Iterator[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows(rows)
    return buffer.getvalue()
