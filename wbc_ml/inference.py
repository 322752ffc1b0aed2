"""Serving predictions. The only door between the web code and TensorFlow.

``get_classifier(spec)`` returns a per-process cached :class:`Classifier` keyed by file path and
checksum, loaded lazily on first use (never at import time, so ``migrate``, the admin and most tests
never start TensorFlow). The rest of the code sees numpy arrays and plain results.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checksums import file_sha256
from .metrics import apply_temperature
from .ood import OodDetector
from .preprocessing import ImageRejected, Normalization
from .turns import averaged_over_turns

logger = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The model file is missing, altered or cannot be loaded; the message is shown to the user."""


def verified_bytes(path: Path, expected_sha256: str | None, what: str) -> bytes:
    """The content of ``path`` if its sha256 is the registered one; :class:`ModelUnavailable` otherwise.

    Read once and checked in memory, so the bytes used are the bytes checked.
    """
    if not expected_sha256:
        raise ModelUnavailable(f"The {what} {path.name} has no registered checksum, so it cannot be verified.")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelUnavailable(f"The {what} {path.name} is missing.") from None
    except OSError as exc:
        raise ModelUnavailable(f"The {what} {path.name} cannot be read: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise ModelUnavailable(
            f"The {what} {path.name} does not match its registered checksum "
            f"(expected {expected_sha256[:12]}…, found {actual[:12]}…); it may be damaged or replaced."
        )
    return data


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    sha256: str
    input_size: tuple[int, int]
    normalization: dict
    class_names: tuple[str, ...]
    temperature: float = 1.0
    ood_path: Path | None = None
    onnx_path: Path | None = None
    ood_sha256: str | None = None  # the registered checksums of the detector file and of the ONNX copy
    onnx_sha256: str | None = None
    # True for our own (bundled) files: TensorFlow serves when there is no usable ONNX copy, and saliency maps
    # load the Keras model here. False for a lab's upload: it is never loaded with Keras in this process, so
    # it is served by its checked ONNX copy or not at all (saliency maps are made in a sandboxed child).
    allow_keras_fallback: bool = True
    # Classify each image as the average of its first ``quarter_turns`` quarter turns (a lab's adapted model whose
    # cross-validation chose it; see wbc_ml.turns). The detectors and Grad-CAM see the image as it is.
    quarter_turns: int = 1


@dataclass(frozen=True)
class Result:
    probabilities: np.ndarray  # calibrated, in class order
    class_index: int
    confidence: float
    ood_score: float | None
    is_outlier: bool
    # Grad-CAM's sum_k alpha_k A_k for the predicted class (before its ReLU), when the ONNX copy gives the map
    gradcam_raw: np.ndarray | None = None


# The ONNX copy's metadata key naming its outputs in order (``features,probabilities,gradcam``); a copy exported
# before it existed has (features, probabilities) or (probabilities) and no map.
ONNX_OUTPUTS_KEY = "wbc_outputs"
OUTPUT_ROLES = ("features", "probabilities", "gradcam")


@dataclass(frozen=True)
class BackendOutput:
    probabilities: np.ndarray  # (B, C), float64
    features: np.ndarray | None  # (B, F) detector features
    gradcam_raw: np.ndarray | None  # (B, H, W, C): every class's Grad-CAM before the ReLU


NON_FINITE_MESSAGE = (
    "The model's output for this image is not a finite number (NaN or infinity), so it cannot be classified; "
    "check the normalisation (mean/std) or the model."
)


class NonFiniteOutput(ImageRejected):
    """The model gave NaN or infinite numbers for an image; nothing may be stored for it."""


def _import_keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


def has_feature_layer(model) -> bool:
    return any(layer.name == "gap" for layer in model.layers)


def serving_model(model, with_features: bool = True):
    """image -> [detector features, probabilities], or probabilities alone.

    The detector features are the classifier's global-average-pooled features (the 'gap' layer, which
    the Mahalanobis distance uses) followed by a global max pooling of the same feature map: peak
    activations tell platelets, erythroblasts and immature granulocytes from the five classes better
    than averages alone. Training, TensorFlow serving and the ONNX export all build it here.
    """
    keras = _import_keras()
    if not (with_features and has_feature_layer(model)):
        return keras.Model(model.inputs, model.outputs)
    gap = model.get_layer("gap")
    return keras.Model(model.inputs, [detector_features(gap.output, gap.input), model.outputs[0]])


def detector_features(pooled, feature_map):
    """The detector features: ``pooled`` (the 'gap' output), then a max pooling of ``feature_map``."""
    keras = _import_keras()
    peaks = keras.layers.GlobalMaxPooling2D(name="ood_max_pool")(feature_map)
    return keras.layers.Concatenate(name="ood_features")([pooled, peaks])


class KerasBackend:
    """TensorFlow serving: ``predict_on_batch`` on the cached model (the fallback path)."""

    name = "tensorflow"

    def __init__(self, model, with_features: bool):
        self.model = serving_model(model, with_features)
        self.with_features = with_features and has_feature_layer(model)
        self._lock = threading.Lock()

    with_gradcam = False  # TensorFlow serving is the fallback: its maps are made by the sandboxed child

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:  # Keras models are not guaranteed re-entrant across threads
            out = self.model.predict_on_batch(batch)
        if self.with_features:
            features, probs = out
            return np.asarray(probs, np.float64), np.asarray(features, np.float64)
        return np.asarray(out, np.float64), None

    def run_all(self, batch: np.ndarray) -> BackendOutput:
        return BackendOutput(*self.run(batch), None)


_ONNX_THREADS = {"intra_op": 0}  # threads of each new ONNX Runtime session (0: its default); see set_onnx_threads


def set_onnx_threads(threads: int) -> None:
    """Limit each ONNX Runtime session made from now on to ``threads`` intra-op threads (0: one per core).

    Several worker processes on one host each take a share of the cores instead of all competing for all.
    """
    _ONNX_THREADS["intra_op"] = max(0, int(threads))


class OnnxBackend:
    """ONNX Runtime serving of the exported model: probabilities, and the detector features and the Grad-CAM maps
    when the copy has them (its ``wbc_outputs`` metadata names the outputs)."""

    name = "onnxruntime"

    def __init__(self, model: bytes | Path):
        """``model``: the verified content of the ONNX file (bytes: no external data is read), or a path."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle intra-op threads sleep instead of spinning: the batch worker decodes the next chunk and the web
        # process answers requests on the same cores while a chunk is classified.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if _ONNX_THREADS["intra_op"]:
            options.intra_op_num_threads = _ONNX_THREADS["intra_op"]
        source = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.roles = self._output_roles()
        self.with_features = "features" in self.roles
        self.with_gradcam = "gradcam" in self.roles

    def _output_roles(self) -> tuple[str, ...]:
        count = len(self.session.get_outputs())
        named = self.session.get_modelmeta().custom_metadata_map.get(ONNX_OUTPUTS_KEY)
        roles = tuple(named.split(",")) if named else ("features", "probabilities")[-count:]
        if len(roles) != count or "probabilities" not in roles or not set(roles) <= set(OUTPUT_ROLES):
            raise ValueError(f"the ONNX copy's {count} outputs do not match its layout {roles}")
        return roles

    def run_all(self, batch: np.ndarray) -> BackendOutput:
        values = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})
        out = dict(zip(self.roles, values, strict=True))
        features = out.get("features")
        return BackendOutput(
            np.asarray(out["probabilities"], np.float64),
            None if features is None else np.asarray(features, np.float64),
            out.get("gradcam"),
        )

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and features only: the Grad-CAM outputs (a map per class) are not computed, so classifying
        a batch costs what the classifier costs."""
        wanted = [role for role in ("probabilities", "features") if role in self.roles]
        names = [self.session.get_outputs()[self.roles.index(role)].name for role in wanted]
        values = self.session.run(names, {self.input_name: np.ascontiguousarray(batch, np.float32)})
        out = dict(zip(wanted, values, strict=True))
        features = None if "features" not in out else np.asarray(out["features"], np.float64)
        return np.asarray(out["probabilities"], np.float64), features


def load_keras_model(path: Path):
    keras = _import_keras()
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # any loader failure means the file is unusable
        raise ModelUnavailable(f"The model file {path.name} could not be loaded: {exc}") from exc


class LoadedModel:
    """A model file loaded for serving: ONNX Runtime when its export checked out, else TensorFlow.

    Loaded once per process per file (see :func:`get_classifier`). The Keras model itself is loaded
    lazily: ONNX serving never needs it, saliency maps do.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        if not spec.path.is_file():
            raise ModelUnavailable(f"The model file {spec.path.name} is missing from the models folder.")
        actual = file_sha256(spec.path)
        if actual != spec.sha256:
            raise ModelUnavailable(
                f"The model file {spec.path.name} does not match its registered checksum "
                f"(expected {spec.sha256[:12]}…, found {actual[:12]}…); it may be damaged or replaced."
            )
        self.ood = None
        if spec.ood_path is not None:  # registered detectors are verified, never silently dropped
            data = verified_bytes(spec.ood_path, spec.ood_sha256, "detector file")
            self.ood = OodDetector.load(io.BytesIO(data))
        self._model = None
        self._model_lock = threading.Lock()
        self.backend = self._onnx_backend()
        if self.backend is None:
            model = self.model
            if self.ood is not None and not has_feature_layer(model):
                logger.warning("%s has no 'gap' layer; the out-of-distribution score is off", spec.path.name)
                self.ood = None
            self.backend = KerasBackend(model, with_features=self.ood is not None)
        elif not self.backend.with_features:
            self.ood = None
        expected = (*spec.input_size, 3)
        try:
            probs, _ = self.backend.run(np.zeros((1, *expected), np.float32))
        except Exception as exc:
            raise ModelUnavailable(f"{spec.path.name} does not accept {expected} images: {exc}") from exc
        if probs.shape != (1, len(spec.class_names)):
            raise ModelUnavailable(
                f"{spec.path.name} gives {probs.shape[-1]} outputs but its card lists {len(spec.class_names)} classes."
            )

    def _onnx_backend(self) -> OnnxBackend | None:
        path = self.spec.onnx_path
        if path is None:
            return self._without_onnx("it has no ONNX copy", log=False)
        if not path.is_file():
            return self._without_onnx(f"its ONNX copy {path} is missing")
        if not self.spec.onnx_sha256:
            return self._without_onnx(f"its ONNX copy {path} has no registered checksum")
        data = verified_bytes(path, self.spec.onnx_sha256, "ONNX copy")  # altered: refused, not served
        try:
            return OnnxBackend(data)
        except Exception as exc:  # a broken export must never stop serving a bundled model
            return self._without_onnx(f"ONNX Runtime could not load its ONNX copy {path} ({exc})")

    def _without_onnx(self, reason: str, log: bool = True) -> None:
        """No usable ONNX copy: TensorFlow serves our own files; an upload is :class:`ModelUnavailable`."""
        if not self.spec.allow_keras_fallback:
            raise ModelUnavailable(
                f"The uploaded model {self.spec.path.name} cannot be used: {reason}. An uploaded model is only "
                "served through its checked ONNX copy, never loaded into the web server; upload it again."
            )
        if log:
            logger.warning("%s: %s; serving with TensorFlow", self.spec.path.name, reason)

    @property
    def holds_keras_model(self) -> bool:
        """Whether this process has loaded the Keras model (TensorFlow serving or a saliency map did)."""
        return self._model is not None

    @property
    def model(self):
        """The Keras model (for TensorFlow serving and saliency gradients), loaded on first use."""
        if not self.spec.allow_keras_fallback:
            raise ModelUnavailable(
                f"The uploaded model {self.spec.path.name} is never loaded with Keras in this process; "
                "its saliency maps are made in a sandboxed child process."
            )
        with self._model_lock:
            if self._model is None:
                model = load_keras_model(self.spec.path)
                expected = (None, *self.spec.input_size, 3)
                if tuple(model.input_shape) != expected:
                    raise ModelUnavailable(
                        f"{self.spec.path.name} expects input {model.input_shape}, but its card says {expected}."
                    )
                self._model = model
            return self._model


class Classifier:
    """A loaded model with the preprocessing and calibration of one spec (normalisation may be overridden)."""

    def __init__(self, spec: ModelSpec, loaded: LoadedModel):
        self.spec = spec
        self.loaded = loaded
        self.backend = loaded.backend
        self.ood = loaded.ood
        self.normalization = Normalization.from_dict(spec.normalization)

    @property
    def model(self):
        return self.loaded.model

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NxHxWx3 (already resized) to normalised float32 model input."""
        return self.normalization.apply(pixels)

    @property
    def serves_with_tensorflow(self) -> bool:
        """Whether this process serves the model with TensorFlow (the fallback for a bundled model)."""
        return isinstance(self.backend, KerasBackend)

    @property
    def has_gradcam(self) -> bool:
        """Whether the served ONNX copy gives Grad-CAM maps (else they are made by TensorFlow in a child)."""
        return self.backend.with_gradcam

    def gradcam_raw(self, pixels: np.ndarray, class_index: int) -> np.ndarray | None:
        """One image's Grad-CAM for ``class_index`` before its ReLU, (H, W) at the feature map's resolution, from the
        ONNX copy; None when the copy has no map output."""
        if not self.has_gradcam:
            return None
        return self.backend.run_all(self.prepare(pixels[None])).gradcam_raw[0, :, :, class_index]

    def predict(self, pixels: np.ndarray, batch_size: int = 32) -> list[Result]:
        """Classify uint8 images (NxHxWx3, already at the model's input size).

        Raises :class:`NonFiniteOutput` when the model's numbers for any image are not finite.
        """
        results = self.predict_each(pixels, batch_size)
        for result in results:
            if isinstance(result, str):
                raise NonFiniteOutput(result)
        return results

    def predict_each(self, pixels: np.ndarray, batch_size: int = 32) -> list[Result | str]:
        """Like :meth:`predict`, but an image whose output is not finite gets the reason (a str) instead."""
        results: list[Result | str] = []
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start : start + batch_size]
            with np.errstate(over="ignore", invalid="ignore"):  # infinities are caught just below
                out = self.backend.run_all(self.prepare(batch))
                raw = averaged_over_turns(
                    out.probabilities, lambda turned: self.backend.run(self.prepare(turned))[0], batch,
                    self.spec.quarter_turns,
                )  # fmt: skip
                probs, features = apply_temperature(raw, self.spec.temperature), out.features
            use_ood = self.ood is not None and features is not None
            finite = np.isfinite(probs).all(axis=1)
            if use_ood:  # the detectors see only finite features, and their score must be finite too
                finite &= np.isfinite(features.reshape(len(features), -1)).all(axis=1)
                scores, outliers = np.full(len(probs), np.nan), np.zeros(len(probs), bool)
                if finite.any():
                    scores[finite], outliers[finite] = self.ood.assess(features[finite])
                finite &= np.isfinite(scores)
            for i, p in enumerate(probs):
                if not finite[i]:
                    results.append(NON_FINITE_MESSAGE)
                    continue
                index = int(np.argmax(p))
                results.append(
                    Result(
                        probabilities=p,
                        class_index=index,
                        confidence=float(p[index]),
                        ood_score=float(scores[i]) if use_ood else None,
                        is_outlier=bool(outliers[i]) if use_ood else False,
                        gradcam_raw=None if out.gradcam_raw is None else out.gradcam_raw[i, :, :, index],
                    )
                )
        return results


_loaded: dict[tuple, LoadedModel] = {}
_cache_lock = threading.Lock()


def get_classifier(spec: ModelSpec) -> Classifier:
    """A classifier for ``spec``; the model file behind it is loaded once per process (by path and checksum)."""
    key = (
        str(spec.path),
        spec.sha256,
        spec.class_names,
        str(spec.ood_path),
        spec.ood_sha256,
        str(spec.onnx_path),
        spec.onnx_sha256,
        spec.allow_keras_fallback,
    )
    with _cache_lock:
        loaded = _loaded.get(key)
        if loaded is None:
            loaded = LoadedModel(spec)
            _loaded[key] = loaded
    return Classifier(spec, loaded)


def clear_cache() -> None:
    with _cache_lock:
        _loaded.clear()
