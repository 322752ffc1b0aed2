"""The non-WBC detectors around training: which cells to fit on, and how often they are flagged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import datasets
from ..checksums import file_sha256
from ..metrics import apply_temperature
from ..ood import OodDetector, split_non_wbc
from ..review_flag import DEFAULT_THRESHOLD
from .augmentation import dihedral_views
from .common import features_and_probs


def non_wbc_halves(data_dir: Path) -> tuple[list[Path], list[Path]]:
    """(fit half, measure half) of ``pbc-non-wbc/`` beside the WBC ``data_dir``; empty when it is absent."""
    non_wbc_dir = Path(data_dir).parent / "pbc-non-wbc"
    if not non_wbc_dir.is_dir():
        return [], []
    paths = sorted(p for p in non_wbc_dir.rglob("*") if p.suffix.lower() in datasets.IMAGE_SUFFIXES)
    return split_non_wbc(paths)


def features_of_paths(model, normalization, paths: list[Path], size, dihedral: bool = False) -> np.ndarray | None:
    """Detector features of image files; with ``dihedral``, of each image's 8 views (8 rows per image)."""
    if not paths:
        return None
    x, _ = datasets.load_arrays([datasets.Sample(p, -1) for p in paths], size)
    if dihedral:
        x = np.concatenate(dihedral_views(x))  # rows view by view; one pass through one serving model
    return features_and_probs(model, x, normalization)[0]


def evaluate_ood(
    model, normalization, temperature, ood, wbc_features, wbc_probs, non_wbc_paths, size, threshold=DEFAULT_THRESHOLD
):
    """Share of held-out non-WBC images flagged for review versus share of WBC test images flagged."""
    if not non_wbc_paths:
        return {}
    x, _ = datasets.load_arrays([datasets.Sample(p, -1) for p in non_wbc_paths], size)
    features, raw = features_and_probs(model, x, normalization)
    probs = apply_temperature(raw, temperature)
    kinds = np.array([p.parent.name for p in non_wbc_paths])
    non_wbc_flagged = (probs.max(axis=1) < threshold) | ood.is_outlier(features)
    wbc_flagged = (wbc_probs.max(axis=1) < threshold) | ood.is_outlier(wbc_features)
    return {
        "evaluated_on": f"{len(non_wbc_paths)} held-out images of pbc-non-wbc/ and the WBC test split",
        "threshold": threshold,
        "non_wbc_flagged_share": float(non_wbc_flagged.mean()),
        "non_wbc_flagged_by_kind": {k: float(non_wbc_flagged[kinds == k].mean()) for k in sorted(set(kinds))},
        "non_wbc_flagged_by_confidence_only": float((probs.max(axis=1) < threshold).mean()),
        "wbc_flagged_share": float(wbc_flagged.mean()),
        "wbc_flagged_by_confidence_only": float((wbc_probs.max(axis=1) < threshold).mean()),
    }


def ood_card(ood: OodDetector, ood_path: Path, ood_eval: dict, outlier_exposure: bool = False) -> dict:
    exposure = (
        "The classifier itself was trained with outlier exposure (training.outlier_exposure): it learned to spread "
        "its confidence over the five classes for the fitting half of pbc-non-wbc/. "
    )
    return {
        "method": (exposure if outlier_exposure else "") + ood.describe(),
        "file": ood_path.name,
        "sha256": file_sha256(ood_path),
        "distance_threshold": ood.distance_threshold,
        "probability_threshold": ood.probability_threshold if ood.has_network else None,
        **ood_eval,
    }
