"""Saliency maps that need TensorFlow, made in a sandboxed child process: ``python -m wbc_ml.saliency_child``.

The web process has no TensorFlow: its Grad-CAM maps come from the models' ONNX copies (:mod:`wbc_ml.cam_export`).
The input-gradient map needs a backward pass through the whole network, and Grad-CAM of a model whose ONNX copy has
no map output (a head the export cannot differentiate, a copy exported before maps existed) needs TensorFlow's
gradient. A lab's uploaded model file is never loaded with Keras in the web process either (see
``ModelSpec.allow_keras_fallback`` in :mod:`wbc_ml.inference`). So the web process calls
:func:`saliency_in_sandbox`, which starts this module in the sandbox of :mod:`wbc_ml.sandbox` (scrubbed
environment, empty temporary home, no network where the host allows it, memory/CPU/file limits, a wall-clock
time-out that kills its process group), for bundled and uploaded models alike.

The child reads one JSON request on stdin (model file path and its registered sha256, input size, normalisation,
class names, the cell image as base64, class index, method), copies the model file into its own temporary folder,
loads that copy with :mod:`wbc_ml.inference` (which refuses it unless its sha256 is the registered one, so the bytes
Keras loads are the bytes checked), computes the map with :mod:`wbc_ml.saliency` and writes one JSON line on its
original stdout: ``{"overlay_base64": ...}``, ``{"refused": reason}`` or ``{"error": reason}``.

Only the standard library and :mod:`wbc_ml.sandbox` are imported at module level: the web process imports this
module without TensorFlow, NumPy or Keras.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from wbc_ml.sandbox import SandboxCrashed, SandboxTimeout, apply_limits, report_channel, run_child, write_report

if TYPE_CHECKING:
    from wbc_ml.inference import ModelSpec

CHILD_MODULE = "wbc_ml.saliency_child"
TIMEOUT_S = 120.0  # loading TensorFlow and one gradient pass on a CPU; seconds for our models
MEMORY_LIMIT_MB = 4096
MAX_ERROR_CHARS = 400


def saliency_in_sandbox(
    spec: ModelSpec,
    image: bytes,
    *,
    class_index: int,
    method: str,
    image_name: str = "image",
    timeout_s: float = TIMEOUT_S,
    memory_limit_mb: int = MEMORY_LIMIT_MB,
) -> bytes:
    """The overlay (WebP bytes) of ``method`` for ``image`` (the stored cell image's bytes), made by the child.

    Raises :class:`wbc_ml.inference.ModelUnavailable` with a plain reason when the child refuses the model file
    (missing, or its sha256 is not the registered one), fails, runs out of time or crashes.
    """
    from wbc_ml.inference import ModelUnavailable

    request = {
        "model_path": str(Path(spec.path).resolve()),
        "sha256": spec.sha256,
        "input_size": list(spec.input_size),
        "normalization": spec.normalization,
        "class_names": list(spec.class_names),
        "image_base64": base64.b64encode(image).decode("ascii"),
        "image_name": image_name,
        "class_index": int(class_index),
        "method": method,
    }
    with tempfile.TemporaryDirectory(prefix="wbc-saliency-") as workdir:
        try:
            report = run_child(
                CHILD_MODULE, request, Path(workdir), timeout_s=timeout_s, memory_limit_mb=memory_limit_mb
            )
        except SandboxTimeout:
            raise ModelUnavailable(
                f"Making the saliency map took longer than {timeout_s:g} s, so it was stopped."
            ) from None
        except SandboxCrashed as exc:
            raise ModelUnavailable(
                f"The saliency map could not be made: its sandboxed process ended ({exc.how}); the model may need "
                f"more than the {memory_limit_mb} MB of memory allowed."
            ) from None
    if "overlay_base64" in report:
        return base64.b64decode(report["overlay_base64"])
    if "refused" in report:
        raise ModelUnavailable(str(report["refused"]))
    raise ModelUnavailable(f"The saliency map could not be made: {report.get('error', 'no reason given')}")


# --- inside the child ---------------------------------------------------------------------------------


def main() -> None:
    """Child entry: JSON request on stdin, one JSON line on the original stdout."""
    result_fd = report_channel()  # whatever TensorFlow or Keras print goes to stderr, not into the report
    memory_limit_mb = 0
    try:
        request = json.loads(sys.stdin.read())
        memory_limit_mb = int(request["memory_limit_mb"])
        apply_limits(request)
        report = {"overlay_base64": base64.b64encode(render(request)).decode("ascii")}
    except MemoryError:
        report = {"error": f"the model needed more than the {memory_limit_mb} MB of memory allowed"}
    except Exception as exc:
        from wbc_ml.inference import ModelUnavailable

        text = " ".join(str(exc).split())
        if isinstance(exc, ModelUnavailable):
            report = {"refused": text}
        else:
            report = {"error": f"{type(exc).__name__}: {text}"[:MAX_ERROR_CHARS]}
    write_report(result_fd, report)


def render(request: dict) -> bytes:
    """The overlay for ``request`` (see the module docstring), computed in this process."""
    from wbc_ml import saliency
    from wbc_ml.inference import ModelSpec, ModelUnavailable, get_classifier
    from wbc_ml.preprocessing import decode_image, resize

    source = Path(request["model_path"])
    copy = Path.cwd() / source.name  # the same name and extension: Keras picks its loader by the extension
    try:
        shutil.copyfile(source, copy)
    except FileNotFoundError:
        raise ModelUnavailable(f"The model file {source.name} is missing.") from None
    spec = ModelSpec(
        path=copy,
        sha256=str(request["sha256"]),
        input_size=(int(request["input_size"][0]), int(request["input_size"][1])),
        normalization=dict(request["normalization"]),
        class_names=tuple(request["class_names"]),
        allow_keras_fallback=True,  # this sandboxed process is where an upload may be loaded with Keras
    )
    classifier = get_classifier(spec)  # refuses the copy unless its sha256 is the registered one
    image = decode_image(base64.b64decode(request["image_base64"]), name=str(request["image_name"]))
    heatmap = saliency.saliency_map(
        classifier, resize(image, spec.input_size), int(request["class_index"]), str(request["method"])
    )
    return saliency.overlay(image, heatmap)


if __name__ == "__main__":
    main()
