"""The model-vetting child process: ``python -m wbc_ml.vetting_child``, started by :mod:`wbc_ml.vetting`.

It reads a JSON request on stdin, caps its own memory, loads the model with Keras (``safe_mode=True``), checks its
input and output shapes and a probe prediction, and writes one JSON line on its original stdout. Whatever
TensorFlow prints goes to stderr.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from wbc_ml.vetting import (
    ADDRESS_SPACE_HEADROOM_MB,
    MIB,
    MIN_INPUT_SIDE,
    PROBABILITY_TOLERANCE,
    PROBE_SEED,
    SUM_TOLERANCE,
    ModelRejected,
    short_text,
)


def _apply_memory_limit(memory_limit_mb: int) -> None:
    """Cap this (loader) process: RLIMIT_DATA is the real cap, RLIMIT_AS a generous backstop."""
    try:
        import resource
    except ImportError:  # not on POSIX: the time-out still applies
        return
    limits = (
        ("RLIMIT_DATA", memory_limit_mb * MIB),
        ("RLIMIT_AS", (memory_limit_mb + ADDRESS_SPACE_HEADROOM_MB) * MIB),
    )
    for name, value in limits:
        which = getattr(resource, name, None)
        if which is None:
            continue
        _soft, hard = resource.getrlimit(which)
        cap = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (cap, cap))


def main() -> None:
    """Loader process entry: JSON request on stdin, one JSON line on the original stdout."""
    result_fd = os.dup(1)
    os.dup2(2, 1)  # whatever TensorFlow or Keras print goes to stderr, not into the report
    memory_limit_mb = 0
    try:
        request = json.loads(sys.stdin.read())
        memory_limit_mb = int(request["memory_limit_mb"])
        _apply_memory_limit(memory_limit_mb)
        if request.get("sleep_s"):
            time.sleep(float(request["sleep_s"]))  # test hook: a load that hangs
        report = _load_and_probe(request["path"], int(request["expected_classes"]))
    except ModelRejected as exc:
        report = {"refused": str(exc)}
    except MemoryError:
        report = {"refused": f"Loading the model needed more than the {memory_limit_mb} MB of memory allowed."}
    except Exception as exc:
        text = " ".join(str(exc).split())
        report = {"error": short_text(f"{type(exc).__name__}: {text}", 400)}
    with os.fdopen(result_fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(report) + "\n")


def _shape(tensor) -> tuple:
    return tuple(None if dim is None else int(dim) for dim in tensor.shape)


def _load_and_probe(path: str, expected_classes: int) -> dict:
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
    return {
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
