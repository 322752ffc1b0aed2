"""Figures of an evaluation run as PNG bytes: the confusion matrix and one-vs-rest ROC curves.

matplotlib is imported inside the functions (it is slow to import and only needed here), and figures are
drawn on an explicit Agg canvas, never through pyplot, so no global state or display is involved.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

DPI = 100


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def confusion_matrix_png(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str = "") -> bytes:
    """Heatmap with rows = true class, columns = predicted class; each cell shows its count and row percent.

    Colour is the share of the true class (the row percentage), so rare classes are as readable as common ones.
    """
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=np.int64).reshape(len(class_names), len(class_names))
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_totals, out=np.zeros(counts.shape, dtype=float), where=row_totals > 0)
    size = 1.3 + 0.95 * len(class_names)
    figure = Figure(figsize=(size + 1.6, size))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colorbar.set_label("share of the true class")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names), rotation=35, ha="right", rotation_mode="anchor")
    axes.set_yticks(ticks, labels=list(class_names))
    axes.set_xlabel("Predicted class")
    axes.set_ylabel("True class")
    axes.set_title(title or f"Confusion matrix (n={int(counts.sum())})")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            text = f"{counts[i, j]}\n{shares[i, j]:.0%}" if row_totals[i, 0] else "0"
            axes.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=9,
                color="white" if shares[i, j] > 0.55 else "#1b1b1b",
            )
    return _png(figure)


def roc_curves_png(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str], title: str = "") -> bytes:
    """One-vs-rest ROC curve per class with its AUC in the legend (classes without positives or negatives skipped)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import auc, roc_curve

    labels = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float).reshape(len(labels), len(class_names))
    figure = Figure(figsize=(6.4, 5.4))
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="chance (AUC 0.50)")
    skipped = []
    for index, name in enumerate(class_names):
        positives = labels == index
        if not 0 < positives.sum() < len(labels):
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, index])
        axes.plot(fpr, tpr, linewidth=2, label=f"{name} (AUC {auc(fpr, tpr):.3f}, n={int(positives.sum())})")
    if skipped:
        axes.text(
            0.98,
            0.02,
            "no curve (label absent or only class): " + ", ".join(skipped),
            transform=axes.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            color="#666666",
            wrap=True,
        )
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_aspect("equal")
    axes.set_xlabel("False positive rate (1 − specificity)")
    axes.set_ylabel("True positive rate (sensitivity)")
    axes.set_title(title or f"One-vs-rest ROC (n={len(labels)})")
    axes.legend(loc="lower right", fontsize=8, bbox_to_anchor=(1.0, 0.08) if skipped else None)
    axes.grid(alpha=0.3)
    return _png(figure)
