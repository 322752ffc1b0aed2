""" "Is this one of the five white cells at all?" — a feature-distance score (no TensorFlow).

Mahalanobis distance (Lee et al. 2018) from the pooled features that feed the classifier's last
layer to the nearest class mean, with one shared, shrunk covariance fitted on the training split.
A cell far from every class (platelet, erythroblast, immature granulocyte) is flagged for review
even when the softmax is confident. The threshold is chosen on the validation split only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.covariance import LedoitWolf

TARGET_VAL_FLAGGED = 0.02


@dataclass
class FeatureDistance:
    means: np.ndarray  # (classes, features)
    precision: np.ndarray  # (features, features)
    threshold: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance to the nearest class mean (larger = less like any training class)."""
        features = np.asarray(features, dtype=np.float64)
        distances = []
        for mean in self.means:
            centred = features - mean
            distances.append(np.einsum("ij,jk,ik->i", centred, self.precision, centred))
        return np.sqrt(np.maximum(np.min(distances, axis=0), 0.0))

    def is_outlier(self, features: np.ndarray) -> np.ndarray:
        return self.score(features) > self.threshold

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            means=self.means.astype(np.float32),
            precision=self.precision.astype(np.float32),
            threshold=np.float64(self.threshold),
        )

    @classmethod
    def load(cls, path: Path) -> FeatureDistance:
        with np.load(path) as data:
            return cls(data["means"].astype(np.float64), data["precision"].astype(np.float64), float(data["threshold"]))

    @staticmethod
    def describe() -> str:
        return (
            "Mahalanobis distance of the pooled penultimate features to the nearest class mean (shared Ledoit-Wolf "
            f"covariance from the train split); threshold = the {1 - TARGET_VAL_FLAGGED:.0%} quantile of validation "
            "WBC distances. An image is flagged for review when its calibrated confidence is below the threshold "
            "OR its distance is above this one. pbc-non-wbc/ is used only to measure, never to fit."
        )


def fit_feature_distance(
    train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray
) -> FeatureDistance:
    train_features = np.asarray(train_features, dtype=np.float64)
    classes = np.unique(train_labels)
    means = np.stack([train_features[train_labels == c].mean(axis=0) for c in classes])
    centred = train_features - means[np.searchsorted(classes, train_labels)]
    precision = LedoitWolf().fit(centred).precision_
    model = FeatureDistance(means, precision, threshold=np.inf)
    model.threshold = float(np.quantile(model.score(val_features), 1 - TARGET_VAL_FLAGGED))
    return model
