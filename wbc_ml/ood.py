""" "Is this one of the five white cells at all?" — scores on the classifier's pooled features (no TF).

The features are those of :func:`wbc_ml.inference.serving_model`: the classifier's average-pooled
features (first half) and a max pooling of the same feature map (second half). Two detectors use them:

* a supervised one: a small neural network (one hidden layer, an ensemble of a few seeds) separating WBC
  training images from the *fitting third* of ``pbc-non-wbc/`` (platelets, erythroblasts, immature
  granulocytes; each image in its 8 flips and quarter turns), so the platform learns what the common
  look-alikes look like; its score is P(not one of the five);
* an unsupervised one: Mahalanobis distance (Lee et al. 2018) of the average-pooled features to the
  nearest class mean with one shared, shrunk covariance, for cells unlike anything seen in training.

Thresholds are set on the *validation* WBC images only: the distance flags a fixed small share of them,
and the network's threshold is the lowest that keeps the validation images flagged for review in all
(low confidence at the default threshold, or either detector) within a budget. ``pbc-non-wbc/`` is cut into
three parts by a hash of each file name (so a file keeps its part when files are added): the *fit* third trains
the network, the *choose* third picks its size and regularisation, and the *report* third, with the WBC test
split, only measures the result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .review_flag import DEFAULT_THRESHOLD

NON_WBC_SPLIT_SEED = "wbc-ood-v2"
NON_WBC_SPLIT_RULE = (
    "Each file of pbc-non-wbc/ goes to part int(sha256('wbc-ood-v2:' + file name), 16) mod 3: 0 fits the detector "
    "network, 1 chooses its size and regularisation, 2 only reports (a file keeps its part when files are added)."
)
NON_WBC_PARTS = ("fit", "choose", "report")
VAL_FLAGGED_BUDGET = 0.025  # share of validation WBC images flagged for review in all (confidence or detectors)
VAL_FLAGGED_BY_DETECTOR_MIN = 0.01  # the network may always flag this share, even when confidence alone is over
VAL_FLAGGED_BY_DISTANCE = 0.002
ENSEMBLE_SEEDS = 5
HIDDEN_UNITS = 128  # the default; the network's own size is read from its weights
ALPHA = 1e-2  # L2 penalty of the detector network


@dataclass
class OodDetector:
    means: np.ndarray  # (classes, average-pooled features)
    precision: np.ndarray  # (features, features)
    distance_threshold: float
    feature_mean: np.ndarray | None = None  # standardisation of the detector network's input
    feature_std: np.ndarray | None = None
    hidden_weights: np.ndarray | None = None  # (members, features, hidden)
    hidden_bias: np.ndarray | None = None  # (members, hidden)
    output_weights: np.ndarray | None = None  # (members, hidden)
    output_bias: np.ndarray | None = None  # (members,)
    probability_threshold: float = 1.0

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of the average-pooled features to the nearest class mean."""
        # (x-m)'P(x-m) = x'Px - 2 m'Px + m'Pm, as matrix products (BLAS): a 32-image chunk of 1280-d
        # features takes milliseconds, where a three-operand einsum loop took about a second.
        x = np.asarray(features, dtype=np.float64)[:, : self.means.shape[1]]
        xp = x @ self.precision
        squared = (xp * x).sum(axis=1)[:, None] - 2.0 * xp @ self.means.T + self._mean_terms[None, :]
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0))

    @cached_property
    def _mean_terms(self) -> np.ndarray:
        """m'Pm for each class mean, computed once rather than for every chunk."""
        return ((self.means @ self.precision) * self.means).sum(axis=1)

    @property
    def has_network(self) -> bool:
        return self.hidden_weights is not None

    def non_wbc_probability(self, features: np.ndarray) -> np.ndarray:
        """The detector network's P(not one of the five), averaged over the ensemble."""
        if not self.has_network:
            return np.zeros(len(features))
        z = (np.asarray(features, np.float64) - self.feature_mean) / self.feature_std
        hidden = np.maximum(z[None] @ self.hidden_weights + self.hidden_bias[:, None, :], 0.0)  # (members, n, hidden)
        logits = (hidden @ self.output_weights[:, :, None])[:, :, 0] + self.output_bias[:, None]
        return (1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))).mean(axis=0)

    def assess(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(score shown to users, outlier flag) for each row, each detector run once."""
        distance = self.distance(features)
        flagged = distance > self.distance_threshold
        if not self.has_network:
            return distance, flagged
        probability = self.non_wbc_probability(features)
        return probability, flagged | (probability >= self.probability_threshold)

    def is_outlier(self, features: np.ndarray) -> np.ndarray:
        return self.assess(features)[1]

    _NETWORK = ("feature_mean", "feature_std", "hidden_weights", "hidden_bias", "output_weights", "output_bias")

    def save(self, path: Path) -> None:
        arrays = {
            "means": self.means.astype(np.float32),
            "precision": self.precision.astype(np.float32),
            "distance_threshold": np.float64(self.distance_threshold),
        }
        if self.has_network:
            arrays |= {name: np.asarray(getattr(self, name), np.float32) for name in self._NETWORK}
            arrays["probability_threshold"] = np.float64(self.probability_threshold)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> OodDetector:
        with np.load(path) as data:
            detector = cls(
                data["means"].astype(np.float64),
                data["precision"].astype(np.float64),
                float(data["distance_threshold"]),
            )
            if "hidden_weights" in data:
                for name in cls._NETWORK:
                    setattr(detector, name, data[name].astype(np.float64))
                detector.probability_threshold = float(data["probability_threshold"])
        return detector

    def describe(self) -> str:
        text = (
            "Flagged for review when the calibrated confidence is below the threshold, OR the Mahalanobis distance of "
            "the average-pooled features to the nearest class mean (shared Ledoit-Wolf covariance, train split) "
            f"exceeds its {1 - VAL_FLAGGED_BY_DISTANCE:.1%} validation-WBC quantile"
        )
        if not self.has_network:
            return text + "."
        return text + (
            f", OR a non-WBC detector network (an ensemble of {len(self.output_bias)} one-hidden-layer networks of "
            f"{self.hidden_weights.shape[2]} units on the average- and max-pooled features, trained on the WBC train "
            "split versus the fitting third of pbc-non-wbc/ in its 8 flips and quarter turns) says 'not a WBC' with "
            "probability at "
            f"least {self.probability_threshold:.3f}: the lowest threshold that keeps at most "
            f"{VAL_FLAGGED_BUDGET:.1%} of validation WBC images flagged in all at confidence "
            f"{DEFAULT_THRESHOLD} (the network alone may always flag {VAL_FLAGGED_BY_DETECTOR_MIN:.0%}). "
            f"{NON_WBC_SPLIT_RULE}"
        )


def average_pooled(features: np.ndarray) -> np.ndarray:
    """The average-pooled half of the detector features (what the classifier's head sees)."""
    return features[:, : features.shape[1] // 2]


class NonWbcParts(NamedTuple):
    fit: list[Path]
    choose: list[Path]
    report: list[Path]


def non_wbc_part(path: Path) -> str:
    """The part of ``pbc-non-wbc/`` a file belongs to, by the hash rule (independent of the other files)."""
    digest = hashlib.sha256(f"{NON_WBC_SPLIT_SEED}:{path.name}".encode()).hexdigest()
    return NON_WBC_PARTS[int(digest, 16) % len(NON_WBC_PARTS)]


def split_non_wbc(paths: list[Path]) -> NonWbcParts:
    """(fit, choose, report) thirds of the non-WBC files, each in the order given."""
    parts: dict[str, list[Path]] = {name: [] for name in NON_WBC_PARTS}
    for path in paths:
        parts[non_wbc_part(path)].append(path)
    return NonWbcParts(**parts)


def network_threshold(val_scores: np.ndarray, already_flagged: np.ndarray) -> float:
    """The lowest score threshold within the validation budget (or the network's own minimum share)."""
    best = np.inf
    for candidate in np.unique(val_scores)[::-1]:  # from the highest score down
        flagged = val_scores >= candidate
        if (already_flagged | flagged).mean() > VAL_FLAGGED_BUDGET and flagged.mean() > VAL_FLAGGED_BY_DETECTOR_MIN:
            break
        best = candidate
    return float(best)


def fit_ood(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_confidence: np.ndarray,
    non_wbc_features: np.ndarray | None = None,
    hidden_units: int = HIDDEN_UNITS,
    alpha: float = ALPHA,
    seeds: int = ENSEMBLE_SEEDS,
) -> OodDetector:
    """Fit both detectors; ``val_confidence`` is the calibrated top probability of each validation image."""
    from sklearn.covariance import LedoitWolf
    from sklearn.neural_network import MLPClassifier

    train_features = np.asarray(train_features, dtype=np.float64)
    pooled = average_pooled(train_features)
    classes = np.unique(train_labels)
    means = np.stack([pooled[train_labels == c].mean(axis=0) for c in classes])
    centred = pooled - means[np.searchsorted(classes, train_labels)]
    precision = LedoitWolf().fit(centred).precision_
    detector = OodDetector(means, precision, distance_threshold=np.inf)
    distances = detector.distance(val_features)
    detector.distance_threshold = float(np.quantile(distances, 1 - VAL_FLAGGED_BY_DISTANCE))
    if non_wbc_features is None or not len(non_wbc_features):
        return detector
    x = np.concatenate([train_features, np.asarray(non_wbc_features, np.float64)])
    y = np.concatenate([np.zeros(len(train_features)), np.ones(len(non_wbc_features))])
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / std
    members = [
        MLPClassifier((hidden_units,), alpha=alpha, max_iter=300, random_state=seed).fit(z, y) for seed in range(seeds)
    ]
    detector.feature_mean, detector.feature_std = mean, std
    detector.hidden_weights = np.stack([m.coefs_[0] for m in members])
    detector.hidden_bias = np.stack([m.intercepts_[0] for m in members])
    detector.output_weights = np.stack([m.coefs_[1][:, 0] for m in members])
    detector.output_bias = np.array([m.intercepts_[1][0] for m in members])
    already = (np.asarray(val_confidence) < DEFAULT_THRESHOLD) | (distances > detector.distance_threshold)
    detector.probability_threshold = network_threshold(detector.non_wbc_probability(val_features), already)
    return detector
