"""Pieces every trainer shares: class weights, batched prediction, the result, the epoch log."""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np

from ..inference import serving_model
from ..preprocessing import Normalization
from .config import Log


@dataclass
class TrainResult:
    model: keras.Model
    normalization: Normalization
    history: dict
    train_features: np.ndarray  # pooled features of the unaugmented training images (for the OOD score)
    val_features: np.ndarray
    val_probs: np.ndarray  # uncalibrated


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return len(labels) / (n_classes * np.maximum(counts, 1))


def predict_in_batches(model: keras.Model, x: np.ndarray, normalization, batch_size: int = 64):
    outputs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        if normalization is not None:
            chunk = normalization.apply(chunk)
        result = model.predict_on_batch(chunk)
        outputs.append(np.asarray(result))
    return np.concatenate(outputs) if outputs else np.zeros((0,))


def features_and_probs(model: keras.Model, x: np.ndarray, normalization: Normalization):
    both = serving_model(model)
    features, probs = [], []
    for start in range(0, len(x), 64):
        f, p = both.predict_on_batch(normalization.apply(x[start : start + 64]))
        features.append(np.asarray(f))
        probs.append(np.asarray(p))
    return np.concatenate(features), np.concatenate(probs)


class EpochLog(keras.callbacks.Callback):
    def __init__(self, log: Log, prefix: str = ""):
        super().__init__()
        self.log, self.prefix, self.started = log, prefix, time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = "  ".join(f"{k}={v:.4f}" for k, v in logs.items() if isinstance(v, float | int))
        self.log(f"{self.prefix}epoch {epoch + 1}: {parts}  ({time.time() - self.started:.0f}s elapsed)")
