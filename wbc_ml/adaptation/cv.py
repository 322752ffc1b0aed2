"""Stratified folds over cells, and out-of-fold metrics with 95% intervals (no TensorFlow)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedKFold

from ..metrics import wilson

BOOTSTRAP_ROUNDS = 1000
MAX_FOLDS = 4


def folds(labels: np.ndarray, seed: int, n_splits: int = MAX_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds over cells (a rare class with fewer cells than folds lands in only some of them)."""
    counts = np.bincount(labels)
    common = counts[counts >= 2]
    n_splits = int(max(2, min(n_splits, common.min() if len(common) else 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only N members"
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(labels)), labels))


def macro_f1(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over all ``n_classes`` (0 for a class never seen nor predicted), as sklearn's zero_division=0."""
    matrix = np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, -1)
    tp = np.diag(matrix).astype(np.float64)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(n_classes), where=denominator > 0)
    return float(f1.mean())


def paired_se(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, seed: int = 0) -> float:
    """Standard error of macro-F1(a) - macro-F1(b) on the same cells, by bootstrap over cells (paired resamples)."""
    labels = np.asarray(labels)
    n_classes = probs_a.shape[1]
    predicted_a, predicted_b = probs_a.argmax(axis=1), probs_b.argmax(axis=1)
    rng = np.random.default_rng(seed)
    differences = [
        macro_f1(labels[idx], predicted_a[idx], n_classes) - macro_f1(labels[idx], predicted_b[idx], n_classes)
        for idx in (rng.integers(0, len(labels), len(labels)) for _ in range(BOOTSTRAP_ROUNDS))
    ]
    return float(np.std(differences, ddof=1))


def oof_summary(labels: np.ndarray, probs: np.ndarray, seed: int = 0) -> dict:
    """Accuracy (Wilson 95%) and macro-F1 (bootstrap 95% over cells) of out-of-fold predictions."""
    labels = np.asarray(labels)
    n_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    correct = int((predicted == labels).sum())
    rng = np.random.default_rng(seed)
    boot = [
        macro_f1(labels[idx], predicted[idx], n_classes)
        for idx in (rng.integers(0, len(labels), len(labels)) for _ in range(BOOTSTRAP_ROUNDS))
    ]
    return {
        "n": len(labels),
        "accuracy": correct / len(labels),
        "accuracy_95ci": wilson(correct, len(labels)),
        "macro_f1": macro_f1(labels, predicted, n_classes),
        "macro_f1_95ci": tuple(float(v) for v in np.quantile(boot, [0.025, 0.975])),
    }
