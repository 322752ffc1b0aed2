"""The model-vetting child process: ``python -m wbc_ml.vetting_child``, started by :mod:`wbc_ml.vetting`.

It reads a JSON request on stdin and sets its own resource limits. Then (``"action": "vet"``) it walks an HDF5
file's stored architecture (h5py is used only here, never in the web process), loads the model with Keras
(``safe_mode=True``), checks its input and output shapes and a probe prediction and, when asked, exports the ONNX
copy used for serving into its working directory. It writes one JSON line on its original stdout; whatever
TensorFlow prints goes to stderr. ``"action": "describe"`` reports the sandbox it runs in (for tests).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path

from wbc_ml.sandbox import apply_limits, report_channel, write_report
from wbc_ml.vetting import (
    CHILD_ONNX_NAME,
    MIN_INPUT_SIDE,
    PROBABILITY_TOLERANCE,
    PROBE_SEED,
    SUM_TOLERANCE,
    ModelRejected,
    inspect_architecture,
    parse_config,
    read_keras_config,
    short_text,
)

LIMIT_NAMES = ("RLIMIT_DATA", "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CPU")


def main() -> None:
    """Loader process entry: JSON request on stdin, one JSON line on the original stdout."""
    result_fd = report_channel()  # whatever TensorFlow or Keras print goes to stderr, not into the report
    memory_limit_mb = 0
    try:
        request = json.loads(sys.stdin.read())
        memory_limit_mb = int(request["memory_limit_mb"])
        apply_limits(request)
        report = _describe(request) if request.get("action") == "describe" else _vet(request)
    except ModelRejected as exc:
        report = {"refused": str(exc)}
    except MemoryError:
        report = {"refused": f"Loading the model needed more than the {memory_limit_mb} MB of memory allowed."}
    except Exception as exc:
        text = " ".join(str(exc).split())
        report = {"error": short_text(f"{type(exc).__name__}: {text}", 400)}
    write_report(result_fd, report)


def _vet(request: dict) -> dict:
    path = request["path"]
    if request.get("inspect"):
        config = _read_h5_config(path) if request["format"] == "h5" else read_keras_config(Path(path))
        inspect_architecture(config)
    if request.get("sleep_s"):
        time.sleep(float(request["sleep_s"]))  # test hook: a load that hangs
    model, report = _load_and_probe(path, int(request["expected_classes"]))
    if request.get("onnx") is not None:
        report |= _export_onnx(model, tuple(report["input_size"]), request["onnx"]["normalization"])
    return report


def _read_h5_config(path: str) -> dict:
    import h5py  # a Keras dependency; only ever imported in this child

    try:
        with h5py.File(path, "r") as handle:
            raw = handle.attrs.get("model_config")
    except (OSError, ValueError, KeyError) as exc:
        raise ModelRejected("The HDF5 file is damaged and cannot be read.") from exc
    if raw is None:
        raise ModelRejected(
            "This HDF5 file is a weights-only file, no model architecture: "
            "save the whole model with model.save(...), not save_weights(...)."
        )
    if not isinstance(raw, bytes | str):  # h5py gives str, or numpy.bytes_ (a bytes subclass)
        raise ModelRejected("The HDF5 file's model_config is not a model description.")
    return parse_config(raw)


def _export_onnx(model, input_size: tuple[int, int], normalization: dict) -> dict:
    """The ONNX copy for serving, in this process's working directory, checked against TensorFlow."""
    from wbc_ml.onnx_export import export_model_onnx, fallback_status, served_status

    try:
        difference = export_model_onnx(model, Path.cwd() / CHILD_ONNX_NAME, input_size, normalization)
    except Exception as exc:  # any failure means: serve with TensorFlow, and say why
        return {"onnx_written": False, "onnx_status": fallback_status(exc)}
    return {"onnx_written": True, "onnx_status": served_status(difference)}


def _describe(request: dict) -> dict:
    """The sandbox as this process sees it (environment, working directory, limits, network)."""
    import resource

    network = "not tried"
    if request.get("connect_port"):
        try:
            with socket.create_connection(("127.0.0.1", int(request["connect_port"])), timeout=3):
                network = "reachable"
        except OSError as exc:
            network = f"unreachable ({exc})"
    return {
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "cwd_entries": sorted(os.listdir(".")),
        "rlimits": {name: resource.getrlimit(getattr(resource, name))[0] for name in LIMIT_NAMES},
        "network": network,
    }


def _shape(tensor) -> tuple:
    return tuple(None if dim is None else int(dim) for dim in tensor.shape)


def _load_and_probe(path: str, expected_classes: int) -> tuple[object, dict]:
    import keras
    import numpy as np

    model = keras.models.load_model(path, compile=False, safe_mode=True)
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except (AttributeError, ValueError, TypeError) as exc:
        raise ModelRejected("The model has no defined input and output shapes (was it ever built?).") from exc
    need_input = f"need one H x W x 3 colour image input (H and W fixed, at least {MIN_INPUT_SIDE})"
    if len(inputs) != 1:
        raise ModelRejected(f"The model has {len(inputs)} inputs; {need_input}.")
    shape = _shape(inputs[0])
    if not (
        len(shape) == 4
        and shape[0] is None
        and shape[3] == 3
        and all(side is not None and side >= MIN_INPUT_SIDE for side in shape[1:3])
    ):
        raise ModelRejected(f"The model expects input {shape}; {need_input}.")
    height, width = shape[1], shape[2]
    if len(outputs) != 1:
        raise ModelRejected(
            f"The model has {len(outputs)} separate outputs; this platform needs a single output of "
            f"{expected_classes} probabilities (one per white-cell class)."
        )
    out_shape = _shape(outputs[0])
    if len(out_shape) != 2 or out_shape[0] is not None:
        raise ModelRejected(
            f"The model's output has shape {out_shape}; this platform needs (None, {expected_classes}): "
            "one probability per white-cell class."
        )
    if out_shape[1] != expected_classes:
        raise ModelRejected(
            f"The model has {out_shape[1]} outputs per image; this platform needs {expected_classes} "
            "(one per white-cell class)."
        )
    probe = np.random.default_rng(PROBE_SEED).random((1, height, width, 3), dtype=np.float32)
    values = np.asarray(keras.ops.convert_to_numpy(model(probe, training=False)), dtype=np.float64).reshape(-1)
    if values.size != expected_classes:
        raise ModelRejected(
            f"The model gave {values.size} values for one image; this platform needs {expected_classes}."
        )
    _check_probabilities(values.tolist())
    return model, {
        "input_size": [height, width],
        "n_outputs": expected_classes,
        "parameters": int(model.count_params()),
        "probabilities": values.tolist(),
    }


def _check_probabilities(values: list[float]) -> None:
    if not all(math.isfinite(v) for v in values):
        raise ModelRejected("The model's outputs on a test image are not finite numbers (NaN or infinity).")
    total = math.fsum(values)
    low, high = min(values), max(values)
    problems = []
    if abs(total - 1.0) > SUM_TOLERANCE:
        problems.append(f"sum {total:.3g}")
    if low < -PROBABILITY_TOLERANCE:
        problems.append(f"smallest {low:.3g}")
    if high > 1.0 + PROBABILITY_TOLERANCE:
        problems.append(f"largest {high:.3g}")
    if problems:
        raise ModelRejected(
            f"The model's outputs are not probabilities ({', '.join(problems)}); it needs a softmax output."
        )


if __name__ == "__main__":
    main()
