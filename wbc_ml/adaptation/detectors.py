"""The 'not one of the five' detectors refitted on a lab's cells, thresholds from its validation folds (no TF)."""

from __future__ import annotations

import numpy as np

from ..ood import OodDetector, fit_ood, network_threshold
from ..review_flag import DEFAULT_THRESHOLD

LAB_DISTANCE_QUANTILE = 0.99  # the distance alone flags about 1% of the lab's own (out-of-fold) cells


def fit_lab_detectors(
    features: np.ndarray,
    labels: np.ndarray,
    splits: list,
    oof_confidence: np.ndarray,
    non_wbc_features: np.ndarray | None,
) -> tuple[OodDetector, dict]:
    """Fit on every view of the lab's cells; set thresholds on out-of-fold scores of the original views.

    ``features``: (cells, views, detector features). Each fold fits the detectors without its cells and scores
    them, so the thresholds reflect cells the detectors have not seen, like the lab's next cells.
    """
    n, views, dim = features.shape
    originals = features[:, 0]
    oof_distance = np.zeros(n)
    oof_probability = np.zeros(n)
    for train, val in splits:
        fold = fit_ood(
            features[train].reshape(-1, dim),
            np.repeat(labels[train], views),
            originals[val],
            oof_confidence[val],
            non_wbc_features,
        )
        oof_distance[val] = fold.distance(originals[val])
        oof_probability[val] = fold.non_wbc_probability(originals[val])
    detector = fit_ood(features.reshape(-1, dim), np.repeat(labels, views), originals, oof_confidence, non_wbc_features)
    detector.distance_threshold = float(np.quantile(oof_distance, LAB_DISTANCE_QUANTILE))
    flagged = (oof_confidence < DEFAULT_THRESHOLD) | (oof_distance > detector.distance_threshold)
    if detector.has_network:
        detector.probability_threshold = network_threshold(oof_probability, flagged)
        flagged |= oof_probability >= detector.probability_threshold
    summary = {
        "oof_flagged_share": float(flagged.mean()),
        "oof_flagged_by_confidence": float((oof_confidence < DEFAULT_THRESHOLD).mean()),
        "non_wbc_images": 0 if non_wbc_features is None else len(non_wbc_features),
    }
    return detector, summary
