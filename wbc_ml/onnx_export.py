"""Export a registered Keras model to ONNX (tf2onnx via Keras) and prove the copy agrees."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from .inference import OnnxBackend, has_feature_layer, load_keras_model, serving_model
from .preprocessing import Normalization

logger = logging.getLogger(__name__)
MAX_PROBABILITY_DIFFERENCE = 1e-4
SERVING_LAYOUT = "f2"  # bump when serving_model's outputs change, so registered models are exported again
PROBE_BATCH = 8


class OnnxExportFailed(RuntimeError):
    pass


def probe_batch(input_size: tuple[int, int], normalization: dict, seed: int = 0) -> np.ndarray:
    """Deterministic smear-coloured noise images, normalised like real input."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(loc=(200, 170, 190), scale=40, size=(PROBE_BATCH, *input_size, 3)).clip(0, 255)
    return Normalization.from_dict(normalization).apply(pixels.astype(np.uint8))


def export_onnx(model_path: Path, onnx_path: Path, input_size: tuple[int, int], normalization: dict) -> float:
    """Load ``model_path`` (our own bundled files only: uploads are exported by the vetting child) and export it."""
    return export_model_onnx(load_keras_model(model_path), onnx_path, input_size, normalization)


def export_model_onnx(model, onnx_path: Path, input_size: tuple[int, int], normalization: dict) -> float:
    """Write ``onnx_path`` and return the max |p_onnx - p_tf| on a probe batch; raise if it is too large."""
    with_features = has_feature_layer(model)
    serving = serving_model(model)
    probe = probe_batch(input_size, normalization)
    reference = serving.predict_on_batch(probe)
    reference_probs = np.asarray(reference[1] if with_features else reference, np.float64)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=onnx_path.parent) as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        try:
            serving.export(str(tmp_path), format="onnx", verbose=False)
        except Exception as exc:
            raise OnnxExportFailed(f"conversion failed: {exc}") from exc
        probs, _ = OnnxBackend(tmp_path.read_bytes()).run(probe)
        difference = float(np.abs(probs - reference_probs).max())
        if not difference <= MAX_PROBABILITY_DIFFERENCE:
            raise OnnxExportFailed(f"ONNX Runtime and TensorFlow disagree by {difference:.2e} (limit 1e-4)")
        tmp_path.replace(onnx_path)
    return difference


def onnx_file_name(stem: str) -> str:
    """The ONNX copy's file name: the registry's ``stem`` for one model row, and the current serving layout."""
    return f"{stem}-{SERVING_LAYOUT}.onnx"


def served_status(difference: float) -> str:
    """The registry's words for a model served by its checked ONNX copy."""
    return f"ONNX Runtime (max |Δp| vs TensorFlow on probe batch: {difference:.1e})"


def fallback_status(error: BaseException | str) -> str:
    """The registry's words for a model served by TensorFlow, and why."""
    return f"TensorFlow fallback: {error}"[:500]
