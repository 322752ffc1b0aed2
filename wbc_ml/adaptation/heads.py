"""Method (a): a new class-balanced logistic-regression head on the pooled features of several views per cell."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


class LinearHead:
    """Standardisation + multinomial logistic regression, convertible to one softmax Dense layer."""

    def __init__(self, c: float, n_classes: int):
        self.c, self.n_classes = c, n_classes

    def fit(self, pooled: np.ndarray, labels: np.ndarray) -> LinearHead:
        """``pooled``: (cells, views, features); every view of a cell gets the cell's label."""
        n, views, dim = pooled.shape
        x = pooled.reshape(n * views, dim)
        y = np.repeat(labels, views)
        self.scaler = StandardScaler().fit(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model = LogisticRegression(C=self.c, class_weight="balanced", max_iter=500).fit(
                self.scaler.transform(x), y
            )
        return self

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(features, classes) weights and bias of the same function on raw pooled features, all classes."""
        coef = np.zeros((self.n_classes, self.scaler.mean_.shape[0]))
        intercept = np.full(self.n_classes, -30.0)  # a class absent from the fitting cells is never predicted
        coef[self.model.classes_] = self.model.coef_ if len(self.model.classes_) > 2 else _binary(self.model.coef_)
        intercept[self.model.classes_] = (
            self.model.intercept_ if len(self.model.classes_) > 2 else _binary(self.model.intercept_[:, None])[:, 0]
        )
        scale = self.scaler.scale_
        w = (coef / scale).T
        b = intercept - (coef * self.scaler.mean_ / scale).sum(axis=1)
        return w, b

    def predict_proba(self, pooled: np.ndarray) -> np.ndarray:
        w, b = self.weights()
        logits = pooled @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)


def _binary(coef: np.ndarray) -> np.ndarray:
    """sklearn's one-row binary model as two softmax rows (same probabilities)."""
    return np.concatenate([-coef / 2, coef / 2])


def cross_validate(
    pooled: np.ndarray, labels: np.ndarray, splits: list, c: float, n_classes: int, served: dict[int, list[int]]
) -> dict[int, np.ndarray]:
    """Out-of-fold probabilities of each cell for each way of serving the head: ``served`` maps a key (the number
    of quarter turns) to the views whose probabilities are averaged (``[0]``: the image as it is)."""
    oof = {key: np.zeros((len(labels), n_classes)) for key in served}
    for train, val in splits:
        head = LinearHead(c, n_classes).fit(pooled[train], labels[train])
        for key, views in served.items():
            oof[key][val] = np.mean([head.predict_proba(pooled[val, v]) for v in views], axis=0)
    return oof
