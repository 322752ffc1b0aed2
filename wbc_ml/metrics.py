"""Classification metrics shared by training, the evaluate command and evaluation runs (no TF)."""

from __future__ import annotations

from itertools import pairwise
from typing import TypedDict

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import norm
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from .review_flag import DEFAULT_THRESHOLD


class ClassMetrics(TypedDict):
    precision: float
    recall: float
    f1: float
    support: int


class MetricsReport(TypedDict):
    n: int
    accuracy: float
    macro_f1: float
    weighted_f1: float
    cohen_kappa: float
    per_class: dict[str, ClassMetrics]
    macro_avg: ClassMetrics
    weighted_avg: ClassMetrics
    confusion_matrix: list[list[int]]
    roc_auc_ovr: dict[str, float | None]
    ece: float
    flagged_share: float
    threshold: float


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scale softmax outputs: softmax(log p / T). T = 1 leaves them unchanged."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return probs / probs.sum(axis=-1, keepdims=True)
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=-1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises validation negative log-likelihood (Guo et al. 2017)."""
    labels = np.asarray(labels)

    def nll(log_t: float) -> float:
        scaled = apply_temperature(probs, float(np.exp(log_t)))
        return float(-np.mean(np.log(np.clip(scaled[np.arange(len(labels)), labels], 1e-12, 1.0))))

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def classification_report(
    labels: np.ndarray, probs: np.ndarray, class_names: list[str], threshold: float = DEFAULT_THRESHOLD
) -> MetricsReport:
    """Accuracy, per-class P/R/F1, averages, kappa, confusion matrix, one-vs-rest ROC AUC, ECE."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    predicted = probs.argmax(axis=1)
    indices = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(labels, predicted, labels=indices, zero_division=0)
    per_class: dict[str, ClassMetrics] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(class_names)
    }
    averages = {}
    for average in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(
            labels, predicted, labels=indices, average=average, zero_division=0
        )
        averages[average] = {
            "precision": float(ap),
            "recall": float(ar),
            "f1": float(af),
            "support": len(labels),
        }
    roc: dict[str, float | None] = {}
    for i, name in enumerate(class_names):
        positives = labels == i
        roc[name] = float(roc_auc_score(positives, probs[:, i])) if 0 < positives.sum() < len(labels) else None
    return {
        "n": len(labels),
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": averages["macro"]["f1"],
        "weighted_f1": averages["weighted"]["f1"],
        "cohen_kappa": float(cohen_kappa_score(labels, predicted, labels=indices)),
        "per_class": per_class,
        "macro_avg": averages["macro"],
        "weighted_avg": averages["weighted"],
        "confusion_matrix": confusion_matrix(labels, predicted, labels=indices).tolist(),
        "roc_auc_ovr": roc,
        "ece": expected_calibration_error(probs, labels),
        "flagged_share": float((probs.max(axis=1) < threshold).mean()) if len(labels) else 0.0,
        "threshold": threshold,
    }


def format_report(report: MetricsReport, class_names: list[str]) -> str:
    """A plain-text table for the terminal."""
    lines = [
        f"n={report['n']}  accuracy={report['accuracy']:.4f}  macro-F1={report['macro_f1']:.4f}  "
        f"kappa={report['cohen_kappa']:.4f}  ECE={report['ece']:.4f}  "
        f"flagged@{report['threshold']:.2f}={report['flagged_share']:.2%}",
        f"{'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}{'roc_auc':>10}",
    ]
    for name in class_names:
        m = report["per_class"][name]
        auc = report["roc_auc_ovr"][name]
        auc_text = f"{auc:.4f}" if auc is not None else "n/a"
        lines.append(
            f"{name:<12}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>10}{auc_text:>10}"
        )
    for label in ("macro_avg", "weighted_avg"):
        m = report[label]
        lines.append(f"{label:<12}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>10}")
    lines.append("confusion matrix (rows true, columns predicted): " + ", ".join(class_names))
    for name, row in zip(class_names, report["confusion_matrix"], strict=True):
        lines.append(f"{name:<12}" + "".join(f"{v:>7}" for v in row))
    return "\n".join(lines)


def wilson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
