"""The non-WBC detectors around training: which cells to fit on, and how often they are flagged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import datasets
from ..checksums import file_sha256
from ..metrics import apply_temperature, wilson
from ..ood import ALPHA, ENSEMBLE_SEEDS, HIDDEN_UNITS, NonWbcParts, OodDetector, fit_ood, split_non_wbc
from ..review_flag import DEFAULT_THRESHOLD
from ..turns import symmetries
from .common import features_and_probs


def non_wbc_parts(data_dir: Path) -> NonWbcParts:
    """The fit / choose / report thirds of ``pbc-non-wbc/`` beside the WBC ``data_dir``; empty when it is absent."""
    non_wbc_dir = Path(data_dir).parent / "pbc-non-wbc"
    if not non_wbc_dir.is_dir():
        return NonWbcParts([], [], [])
    paths = sorted(p for p in non_wbc_dir.rglob("*") if p.suffix.lower() in datasets.IMAGE_SUFFIXES)
    return split_non_wbc(paths)


def features_of_paths(model, normalization, paths: list[Path], size, dihedral: bool = False) -> np.ndarray | None:
    """Detector features of image files; with ``dihedral``, of each image's 8 views (8 rows per image)."""
    if not paths:
        return None
    x, _ = datasets.load_arrays([datasets.Sample(p, -1) for p in paths], size)
    if dihedral:
        x = np.concatenate(symmetries(x))  # rows view by view; one pass through one serving model
    return features_and_probs(model, x, normalization)[0]


# The detector network's (hidden units, L2 alpha) candidates; the choose third of pbc-non-wbc/ picks one.
DETECTOR_CANDIDATES = ((HIDDEN_UNITS, ALPHA / 10), (HIDDEN_UNITS, ALPHA), (HIDDEN_UNITS, ALPHA * 10))


def flagged(probs: np.ndarray, ood: OodDetector, features: np.ndarray, threshold: float = DEFAULT_THRESHOLD):
    """Flagged for review as the web app flags: low calibrated confidence, or either detector."""
    return (probs.max(axis=1) < threshold) | ood.is_outlier(features)


def fit_and_choose_detector(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    fit_features: np.ndarray | None,
    choose: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[OodDetector, dict]:
    """Fit a one-seed detector per candidate, keep the candidate that flags most of the choose third, and fit it
    again as the full ensemble.

    ``train`` is (features, labels) of the WBC train split, ``val`` (features, calibrated probabilities) of the WBC
    validation split, ``choose`` (features, calibrated probabilities) of the choose third of non-WBC cells. Every
    candidate keeps the same share of validation WBC images flagged (the thresholds are set on them), so the choose
    third's flagged share decides; a tie goes to the earlier (more regularised) candidate.
    """
    val_features, val_probs = val

    def fit(units: int, alpha: float, seeds: int = ENSEMBLE_SEEDS) -> OodDetector:
        return fit_ood(
            *train, val_features, val_probs.max(axis=1), fit_features, hidden_units=units, alpha=alpha, seeds=seeds
        )

    if fit_features is None or choose is None:
        return fit(HIDDEN_UNITS, ALPHA), {}
    scores = {
        (units, alpha): float(flagged(choose[1], fit(units, alpha, seeds=1), choose[0]).mean())
        for units, alpha in DETECTOR_CANDIDATES
    }
    units, alpha = max(DETECTOR_CANDIDATES, key=lambda candidate: scores[candidate])
    choice = {
        "chosen_on": f"{len(choose[0])} images of the choose third of pbc-non-wbc/: the share each candidate (one "
        "seed) flags; the best is then fitted as the full ensemble",
        "candidates": {f"{u} units, alpha {a:g}": share for (u, a), share in scores.items()},
        "chosen": f"{units} units, alpha {alpha:g}",
    }
    return fit(units, alpha), choice


def fit_detectors(
    model, normalization, temperature: float, size, parts: NonWbcParts, train, val
) -> tuple[OodDetector, dict]:
    """The detectors of a served model: the network fitted on the fit third, chosen on the choose third (see
    :func:`fit_and_choose_detector` for ``train`` and ``val``)."""
    fit_features = features_of_paths(model, normalization, parts.fit, size, dihedral=True)
    choose = None
    if parts.choose:
        x, _ = datasets.load_arrays([datasets.Sample(p, -1) for p in parts.choose], size)
        features, raw = features_and_probs(model, x, normalization)
        choose = (features, apply_temperature(raw, temperature))
    return fit_and_choose_detector(train, val, fit_features, choose)


def evaluate_ood(
    model, normalization, temperature, ood, wbc_features, wbc_probs, non_wbc_paths, size, threshold=DEFAULT_THRESHOLD
):
    """Share of report-third non-WBC images flagged for review versus share of WBC test images flagged (95% Wilson
    intervals), counting the detectors as the web app does."""
    if not non_wbc_paths:
        return {}
    x, _ = datasets.load_arrays([datasets.Sample(p, -1) for p in non_wbc_paths], size)
    features, raw = features_and_probs(model, x, normalization)
    probs = apply_temperature(raw, temperature)
    kinds = np.array([p.parent.name for p in non_wbc_paths])
    non_wbc_flagged = flagged(probs, ood, features, threshold)
    wbc_flagged = flagged(wbc_probs, ood, wbc_features, threshold)

    def share(values: np.ndarray) -> tuple[float, tuple[float, float]]:
        return float(values.mean()), wilson(int(values.sum()), len(values))

    return {
        "evaluated_on": f"{len(non_wbc_paths)} images of the report third of pbc-non-wbc/ and the WBC test split",
        "threshold": threshold,
        "non_wbc_flagged_share": share(non_wbc_flagged)[0],
        "non_wbc_flagged_share_95ci": share(non_wbc_flagged)[1],
        "non_wbc_flagged_by_kind": {k: share(non_wbc_flagged[kinds == k])[0] for k in sorted(set(kinds))},
        "non_wbc_flagged_by_kind_95ci": {k: share(non_wbc_flagged[kinds == k])[1] for k in sorted(set(kinds))},
        "non_wbc_flagged_by_confidence_only": float((probs.max(axis=1) < threshold).mean()),
        "wbc_flagged_share": share(wbc_flagged)[0],
        "wbc_flagged_share_95ci": share(wbc_flagged)[1],
        "wbc_flagged_by_confidence_only": float((wbc_probs.max(axis=1) < threshold).mean()),
    }


def ood_card(
    ood: OodDetector, ood_path: Path, ood_eval: dict, outlier_exposure: str = "", choice: dict | None = None
) -> dict:
    """The card's "ood" section; ``outlier_exposure`` is the card's account of the classifier's own outlier exposure."""
    exposure = (
        f"The classifier itself was trained with outlier exposure ({outlier_exposure}): it learned to spread its "
        "confidence over the five classes for those non-WBC images; any of them that now fall in the choose or "
        "report third make those numbers optimistic for this model. "
    )
    return {
        "method": (exposure if outlier_exposure else "") + ood.describe(),
        "file": ood_path.name,
        "sha256": file_sha256(ood_path),
        "distance_threshold": ood.distance_threshold,
        "probability_threshold": ood.probability_threshold if ood.has_network else None,
        **({"detector_choice": choice} if choice else {}),
        **ood_eval,
    }
