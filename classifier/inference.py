"""Serving predictions. The only door between the web code and TensorFlow.

``get_classifier(spec)`` returns a per-process cached :class:`Classifier` keyed by file path and
checksum, loaded lazily on first use (never at import time, so ``migrate``, the admin and most tests
never start TensorFlow). The rest of the code sees numpy arrays and plain results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .metrics import apply_temperature
from .ood import FeatureDistance
from .preprocessing import Normalization

logger = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The model file is missing, altered or cannot be loaded; the message is shown to the user."""


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    sha256: str
    input_size: tuple[int, int]
    normalization: dict
    class_names: tuple[str, ...]
    temperature: float = 1.0
    ood_path: Path | None = None


@dataclass(frozen=True)
class Result:
    probabilities: np.ndarray  # calibrated, in class order
    class_index: int
    confidence: float
    ood_score: float | None
    is_outlier: bool


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _import_keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


class Classifier:
    """A loaded Keras model plus its card's preprocessing, calibration and OOD score."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.normalization = Normalization.from_dict(spec.normalization)
        if not spec.path.is_file():
            raise ModelUnavailable(f"The model file {spec.path.name} is missing from the models folder.")
        actual = file_sha256(spec.path)
        if actual != spec.sha256:
            raise ModelUnavailable(
                f"The model file {spec.path.name} does not match its registered checksum "
                f"(expected {spec.sha256[:12]}…, found {actual[:12]}…); it may be damaged or replaced."
            )
        keras = _import_keras()
        try:
            self.model = keras.models.load_model(spec.path, compile=False, safe_mode=True)
        except Exception as exc:  # any loader failure means the file is unusable
            raise ModelUnavailable(f"The model file {spec.path.name} could not be loaded: {exc}") from exc
        expected = (None, *spec.input_size, 3)
        if tuple(self.model.input_shape) != expected:
            raise ModelUnavailable(
                f"{spec.path.name} expects input {self.model.input_shape}, but its card says {expected}."
            )
        self.ood = FeatureDistance.load(spec.ood_path) if spec.ood_path and spec.ood_path.is_file() else None
        self._features_model = None
        if self.ood is not None:
            try:
                features = self.model.get_layer("gap").output
                self._features_model = keras.Model(self.model.inputs, [features, self.model.outputs[0]])
            except ValueError:
                logger.warning("%s has no 'gap' layer; the out-of-distribution score is off", spec.path.name)
                self.ood = None
        self._lock = threading.Lock()

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NxHxWx3 (already resized) to normalised float32 model input."""
        return self.normalization.apply(pixels)

    def raw_probabilities(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:  # Keras models are not guaranteed re-entrant across threads
            if self._features_model is not None:
                features, probs = self._features_model.predict_on_batch(batch)
                return np.asarray(probs, np.float64), np.asarray(features, np.float64)
            return np.asarray(self.model.predict_on_batch(batch), np.float64), None

    def predict(self, pixels: np.ndarray, batch_size: int = 32) -> list[Result]:
        """Classify uint8 images (NxHxWx3, already at the model's input size)."""
        results: list[Result] = []
        for start in range(0, len(pixels), batch_size):
            raw, features = self.raw_probabilities(self.prepare(pixels[start : start + batch_size]))
            probs = apply_temperature(raw, self.spec.temperature)
            scores = self.ood.score(features) if self.ood is not None else None
            for i, p in enumerate(probs):
                index = int(np.argmax(p))
                score = float(scores[i]) if scores is not None else None
                results.append(
                    Result(
                        probabilities=p,
                        class_index=index,
                        confidence=float(p[index]),
                        ood_score=score,
                        is_outlier=bool(score is not None and score > self.ood.threshold),
                    )
                )
        return results


_cache: dict[tuple[str, str], Classifier] = {}
_cache_lock = threading.Lock()


def get_classifier(spec: ModelSpec) -> Classifier:
    """The process-wide cached classifier for this file, checksum and card settings (loaded once)."""
    key = (
        str(spec.path),
        spec.sha256,
        json.dumps(spec.normalization, sort_keys=True),
        spec.class_names,
        spec.temperature,
        str(spec.ood_path),
    )
    with _cache_lock:
        classifier = _cache.get(key)
        if classifier is None:
            classifier = Classifier(spec)
            _cache[key] = classifier
        return classifier


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
