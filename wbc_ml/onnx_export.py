"""Export a registered Keras model to ONNX (tf2onnx via Keras) and prove the copy agrees."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from .cam_export import gradcam_output
from .inference import ONNX_OUTPUTS_KEY, OnnxBackend, has_feature_layer, load_keras_model, serving_model
from .preprocessing import Normalization

logger = logging.getLogger(__name__)
MAX_PROBABILITY_DIFFERENCE = 1e-4
MAX_GRADCAM_DIFFERENCE = 1e-3  # of the map's range, on the probe batch
# Bump when the exported outputs change, so registered models are exported again. f3: Grad-CAM maps as an output.
SERVING_LAYOUT = "f3"
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
    """Write ``onnx_path`` and return the max |p_onnx - p_tf| on a probe batch; raise if it is too large.

    The copy's outputs are the detector features (when the model has its 'gap' layer), the probabilities and, when
    the head after the global pooling can be differentiated in the graph (:mod:`wbc_ml.cam_export`), every class's
    Grad-CAM map. The map is checked against TensorFlow's own gradient on the probe batch; a copy whose map does not
    agree is exported again without it (its maps are then made by TensorFlow in the sandboxed child), never served.
    """
    probe = probe_batch(input_size, normalization)
    serving = serving_model(model)
    roles = ["features", "probabilities"] if has_feature_layer(model) else ["probabilities"]
    gradcam = gradcam_output(model)
    if gradcam is not None:
        try:
            return _export_checked(model, [*serving.outputs, gradcam], [*roles, "gradcam"], onnx_path, probe)
        except GradcamMismatch as exc:
            logger.warning("%s: Grad-CAM left out of the ONNX copy (%s)", onnx_path.name, exc)
    return _export_checked(model, serving.outputs, roles, onnx_path, probe)


class GradcamMismatch(OnnxExportFailed):
    pass


def _export_checked(model, outputs: list, roles: list[str], onnx_path: Path, probe: np.ndarray) -> float:
    import keras

    serving = keras.Model(model.inputs, outputs)
    predicted = serving.predict_on_batch(probe)
    predicted = predicted if len(outputs) > 1 else [predicted]
    reference = dict(zip(roles, (np.asarray(out, np.float64) for out in predicted), strict=True))
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=onnx_path.parent) as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        try:
            serving.export(str(tmp_path), format="onnx", verbose=False)
            _name_outputs(tmp_path, roles)
        except Exception as exc:
            raise OnnxExportFailed(f"conversion failed: {exc}") from exc
        out = OnnxBackend(tmp_path.read_bytes()).run_all(probe)
        difference = float(np.abs(out.probabilities - reference["probabilities"]).max())
        if not difference <= MAX_PROBABILITY_DIFFERENCE:
            raise OnnxExportFailed(f"ONNX Runtime and TensorFlow disagree by {difference:.2e} (limit 1e-4)")
        if "gradcam" in roles:
            _check_gradcam(model, probe, reference["gradcam"], out.gradcam_raw)
        tmp_path.replace(onnx_path)
    return difference


def _name_outputs(path: Path, roles: list[str]) -> None:
    """Record the outputs' roles in the copy's metadata, so serving never guesses them from their number."""
    import onnx

    exported = onnx.load(str(path))
    entry = exported.metadata_props.add()
    entry.key, entry.value = ONNX_OUTPUTS_KEY, ",".join(roles)
    onnx.save(exported, str(path))


def _check_gradcam(model, probe: np.ndarray, graph_maps: np.ndarray, onnx_maps: np.ndarray) -> None:
    """The graph's maps equal TensorFlow's Grad-CAM (GradientTape) for every class, and the ONNX copy's equal them."""
    from .saliency import keras_gradcam_raw_classes

    every_class = keras_gradcam_raw_classes(model, probe, list(range(graph_maps.shape[-1])))
    for class_index in range(graph_maps.shape[-1]):
        expected = every_class[..., class_index]
        scale = max(float(np.abs(expected).max()), 1e-12)
        for what, maps in (("the exported graph", graph_maps), ("ONNX Runtime", onnx_maps)):
            error = float(np.abs(maps[..., class_index] - expected).max()) / scale
            if not error <= MAX_GRADCAM_DIFFERENCE:
                raise GradcamMismatch(f"{what} differs from TensorFlow's Grad-CAM by {error:.1e} of its range")


def onnx_file_name(stem: str) -> str:
    """The ONNX copy's file name: the registry's ``stem`` for one model row, and the current serving layout."""
    return f"{stem}-{SERVING_LAYOUT}.onnx"


def served_status(difference: float) -> str:
    """The registry's words for a model served by its checked ONNX copy."""
    return f"ONNX Runtime (max |Δp| vs TensorFlow on probe batch: {difference:.1e})"


def fallback_status(error: BaseException | str) -> str:
    """The registry's words for a model served by TensorFlow, and why."""
    return f"TensorFlow fallback: {error}"[:500]
