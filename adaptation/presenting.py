"""Rows for the adaptation pages' tables, from the lab's cells and a job's held-back evaluation."""

from __future__ import annotations

from wbc_ml.adaptation.cells import MIN_CELLS_PER_CLASS

from .cells import RECOMMENDED_PER_CLASS, LabCells


def count_rows(found: LabCells, sources: list[str]) -> list[dict]:
    """Per class: the cells of each source, the usable total (one per image) and whether it is enough."""
    rows = []
    for name, total in found.counts().items():
        if total < MIN_CELLS_PER_CLASS:
            verdict = "too few"
        elif total < RECOMMENDED_PER_CLASS:
            verdict = "fewer than recommended"
        else:
            verdict = "enough"
        per_source = [found.per_source.get(source, {}).get(name, 0) for source in sources]
        rows.append({"name": name, "per_source": per_source, "total": total, "verdict": verdict})
    return rows


def _matrix(report: dict, class_names: list[str]) -> list[dict]:
    rows = []
    for i, (name, counts) in enumerate(zip(class_names, report.get("confusion_matrix") or [], strict=False)):
        rows.append({"name": name, "cells": [{"count": c, "diagonal": j == i} for j, c in enumerate(counts)]})
    return rows


def comparison(evaluation: dict, class_names: list[str]) -> dict:
    """Base vs adapted on the held-back cells: the headline metrics, per-class recall and both confusion matrices."""
    base, adapted = evaluation["base"], evaluation["adapted"]
    headline = [
        ("Accuracy", base["accuracy"], adapted["accuracy"]),
        ("Macro-F1", base["macro_f1"], adapted["macro_f1"]),
        ("Flagged for review (detectors counted)", base["flagged_share"], adapted["flagged_share"]),
        (
            "Flagged by confidence alone",
            base["metrics"].get("flagged_share_confidence_only"),
            adapted["metrics"].get("flagged_share_confidence_only"),
        ),
    ]
    recall = [
        {
            "name": name,
            "support": adapted["metrics"]["per_class"][name]["support"],
            "base": base["metrics"]["per_class"][name]["recall"],
            "adapted": adapted["metrics"]["per_class"][name]["recall"],
        }
        for name in class_names
    ]
    return {
        "n": adapted["n"],
        "threshold": evaluation.get("threshold"),
        "headline": [{"name": n, "base": b, "adapted": a} for n, b, a in headline],
        "accuracy_95ci": {"base": base.get("accuracy_95ci"), "adapted": adapted.get("accuracy_95ci")},
        "recall": recall,
        "matrices": [
            (title, _matrix(result["metrics"], class_names)) for title, result in (("Base", base), ("Adapted", adapted))
        ],
        "class_names": class_names,
        "files": evaluation.get("files") or [],
    }
