""" "Is this one of the five white cells at all?" — scores on the classifier's pooled features (no TF).

Two detectors share the features that feed the classifier's last layer:

* a supervised one: logistic regression, WBC training images versus *half* of ``pbc-non-wbc/``
  (platelets, erythroblasts, immature granulocytes; split per kind by a hash rule), so the platform
  learns what the common look-alikes look like; its score is P(not one of the five);
* an unsupervised one: Mahalanobis distance (Lee et al. 2018) to the nearest class mean with one
  shared, shrunk covariance, for cells unlike anything seen in training.

Both thresholds are set on the *validation* WBC images only (a fixed share of them may be flagged).
The other half of ``pbc-non-wbc/`` and the WBC test split measure the result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NON_WBC_SPLIT_SEED = "wbc-ood-v1"
NON_WBC_SPLIT_RULE = (
    "Per kind (erythroblast, ig, platelet), files sorted by sha256('wbc-ood-v1:' + file name): the first half fits "
    "the detector, the second half only measures it."
)
VAL_FLAGGED_BY_DETECTOR = 0.01  # share of validation WBC images each detector may flag
VAL_FLAGGED_BY_DISTANCE = 0.005


@dataclass
class OodDetector:
    means: np.ndarray  # (classes, features)
    precision: np.ndarray  # (features, features)
    distance_threshold: float
    coef: np.ndarray | None = None  # logistic regression on standardised features
    intercept: float = 0.0
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None
    probability_threshold: float = 1.0

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance to the nearest class mean."""
        features = np.asarray(features, dtype=np.float64)
        distances = []
        for mean in self.means:
            centred = features - mean
            distances.append(np.einsum("ij,jk,ik->i", centred, self.precision, centred))
        return np.sqrt(np.maximum(np.min(distances, axis=0), 0.0))

    def non_wbc_probability(self, features: np.ndarray) -> np.ndarray:
        if self.coef is None:
            return np.zeros(len(features))
        z = (np.asarray(features, np.float64) - self.feature_mean) / self.feature_std
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))

    def score(self, features: np.ndarray) -> np.ndarray:
        """The number shown to users: P(not one of the five classes), or the distance without a detector."""
        return self.non_wbc_probability(features) if self.coef is not None else self.distance(features)

    def is_outlier(self, features: np.ndarray) -> np.ndarray:
        flagged = self.distance(features) > self.distance_threshold
        if self.coef is not None:
            flagged |= self.non_wbc_probability(features) > self.probability_threshold
        return flagged

    def save(self, path: Path) -> None:
        arrays = {
            "means": self.means.astype(np.float32),
            "precision": self.precision.astype(np.float32),
            "distance_threshold": np.float64(self.distance_threshold),
        }
        if self.coef is not None:
            arrays |= {
                "coef": self.coef.astype(np.float64),
                "intercept": np.float64(self.intercept),
                "feature_mean": self.feature_mean.astype(np.float64),
                "feature_std": self.feature_std.astype(np.float64),
                "probability_threshold": np.float64(self.probability_threshold),
            }
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> OodDetector:
        with np.load(path) as data:
            detector = cls(
                data["means"].astype(np.float64),
                data["precision"].astype(np.float64),
                float(data["distance_threshold"]),
            )
            if "coef" in data:
                detector.coef = data["coef"]
                detector.intercept = float(data["intercept"])
                detector.feature_mean = data["feature_mean"]
                detector.feature_std = data["feature_std"]
                detector.probability_threshold = float(data["probability_threshold"])
        return detector

    def describe(self) -> str:
        text = (
            "Flagged for review when the calibrated confidence is below the threshold, OR the Mahalanobis distance of "
            "the pooled penultimate features to the nearest class mean (shared Ledoit-Wolf covariance, train split) "
            f"exceeds its {1 - VAL_FLAGGED_BY_DISTANCE:.1%} validation-WBC quantile"
        )
        if self.coef is not None:
            text += (
                ", OR a logistic-regression non-WBC detector on the same features (trained on the WBC train split "
                "versus the fitting half of pbc-non-wbc/) exceeds its "
                f"{1 - VAL_FLAGGED_BY_DETECTOR:.0%} validation-WBC quantile. {NON_WBC_SPLIT_RULE}"
            )
            return text
        return text + "."


def split_non_wbc(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(fit half, measure half), per kind folder, by the hash rule."""
    fit, measure = [], []
    for kind in sorted({p.parent for p in paths}):
        members = sorted(
            (p for p in paths if p.parent == kind),
            key=lambda p: hashlib.sha256(f"{NON_WBC_SPLIT_SEED}:{p.name}".encode()).hexdigest(),
        )
        half = len(members) // 2
        fit += members[:half]
        measure += members[half:]
    return fit, measure


def fit_ood(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    non_wbc_features: np.ndarray | None = None,
) -> OodDetector:
    from sklearn.covariance import LedoitWolf
    from sklearn.linear_model import LogisticRegression

    train_features = np.asarray(train_features, dtype=np.float64)
    classes = np.unique(train_labels)
    means = np.stack([train_features[train_labels == c].mean(axis=0) for c in classes])
    centred = train_features - means[np.searchsorted(classes, train_labels)]
    precision = LedoitWolf().fit(centred).precision_
    detector = OodDetector(means, precision, distance_threshold=np.inf)
    detector.distance_threshold = float(np.quantile(detector.distance(val_features), 1 - VAL_FLAGGED_BY_DISTANCE))
    if non_wbc_features is not None and len(non_wbc_features):
        x = np.concatenate([train_features, np.asarray(non_wbc_features, np.float64)])
        y = np.concatenate([np.zeros(len(train_features)), np.ones(len(non_wbc_features))])
        mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
        model = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000)
        model.fit((x - mean) / std, y)
        detector.coef, detector.intercept = model.coef_[0], float(model.intercept_[0])
        detector.feature_mean, detector.feature_std = mean, std
        detector.probability_threshold = float(
            np.quantile(detector.non_wbc_probability(val_features), 1 - VAL_FLAGGED_BY_DETECTOR)
        )
    return detector
