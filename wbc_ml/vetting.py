"""Vetting a user-uploaded Keras model file before anything is stored or activated.

``validate_model_file(path)`` either returns a :class:`ValidatedModel` or raises :class:`ModelRejected`,
whose ``str()`` is a plain sentence for the person who uploaded the file. The checks run cheapest
first, so most bad uploads are refused without ever starting TensorFlow:

1. size: an empty file, or one over ``max_bytes``, is refused;
2. format, read from the content (the file name is ignored): HDF5 signature -> ``"h5"`` (legacy
   Keras 2 / tf.keras), a zip holding ``config.json`` and ``metadata.json`` -> ``"keras"`` (Keras 3);
3. the stored architecture is read as plain JSON (never deserialised) and walked, nested models
   included: every layer must be a built-in Keras layer on :data:`ALLOWED_LAYERS`; Lambda-style
   layers, serialised Python code, custom registered objects and objects from modules outside Keras
   are refused by name;
4. the model is loaded in a separate, short-lived Python process (``keras.models.load_model(...,
   compile=False, safe_mode=True)``) under a wall-clock time-out and a memory cap; there it must
   take one ``(None, H, W, 3)`` image input and give one ``(None, expected_classes)`` output, and its
   prediction on a fixed probe image must be a probability vector;
5. the file's SHA-256 is recorded.

Only the standard library is imported here at module level. TensorFlow/Keras are only ever imported
inside the loader process; h5py only inside the HDF5 inspection.

The loader process is ``python -m wbc_ml.vetting_child`` (:mod:`wbc_ml.vetting_child`; ``wbc_ml`` imports no
Django): it reads a JSON request on stdin and writes one
JSON line back on its original stdout (anything TensorFlow prints is redirected to stderr). It runs in
its own session (process group) with an empty temporary working directory, so a time-out kills the
whole group. Its memory is capped with ``RLIMIT_DATA`` (heap and other private writable memory,
``memory_limit_mb``) plus a looser ``RLIMIT_AS`` backstop, because TensorFlow reserves far more
address space than it uses. TensorFlow itself needs roughly 0.5 GB of that allowance.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .checksums import file_sha256

logger = logging.getLogger(__name__)

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
MIB = 1024 * 1024
MIN_INPUT_SIDE = 16
PROBABILITY_TOLERANCE = 1e-4  # each output within [0 - tol, 1 + tol]
SUM_TOLERANCE = 1e-3  # outputs sum to 1 within this
PROBE_SEED = 0
MAX_CONFIG_BYTES = 32 * MIB  # an architecture description is kilobytes; refuse absurd ones
MAX_CONFIG_DEPTH = 400  # nesting depth of the JSON walk (nested models add a few levels each)
ARCHIVE_EXPANSION_FACTOR = 4  # a .keras archive may unpack to at most this multiple of max_bytes
ADDRESS_SPACE_HEADROOM_MB = 4096  # RLIMIT_AS = memory_limit_mb + this (TensorFlow reserves a lot)
CHILD_THREADS = "2"  # the loader only runs one tiny prediction; keeps its thread (and stack) count low

# Built-in layer classes accepted anywhere in the architecture (the usual CNN building blocks).
MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})
ALLOWED_LAYERS = frozenset(
    {
        "InputLayer",
        "Conv2D",
        "DepthwiseConv2D",
        "SeparableConv2D",
        "Conv2DTranspose",
        "Dense",
        "BatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "Activation",
        "ReLU",
        "LeakyReLU",
        "PReLU",
        "ELU",
        "Softmax",
        "Dropout",
        "SpatialDropout2D",
        "GaussianNoise",
        "GaussianDropout",
        "MaxPooling2D",
        "AveragePooling2D",
        "GlobalAveragePooling2D",
        "GlobalMaxPooling2D",
        "Flatten",
        "Reshape",
        "ZeroPadding2D",
        "Cropping2D",
        "UpSampling2D",
        "Add",
        "Multiply",
        "Concatenate",
        "Average",
        "Maximum",
        "Minimum",
        "Subtract",
        "Rescaling",
        "Normalization",
        "Resizing",
        "CenterCrop",
        "RandomFlip",
        "RandomRotation",
        "RandomZoom",
        "RandomContrast",
        "RandomBrightness",
        "RandomTranslation",
        "Permute",
        "RepeatVector",
        "Identity",
        *MODEL_CLASSES,
    }
)
# Layers that wrap arbitrary Python (or raw TensorFlow) code; named specially in the refusal.
CODE_LAYERS = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda"})
# Serialised objects may only come from Keras itself (Keras 3, Keras 2 / tf.keras, tf_keras).
KERAS_MODULE_ROOTS = ("keras", "tf_keras", "tf.keras", "tensorflow.keras", "tensorflow.python.keras")
# Functions referenced by name (e.g. an activation) may only be Keras' own activations.
FUNCTION_MODULES = frozenset(
    {
        "keras.activations",
        "keras.src.activations",
        "keras.src.activations.activations",
        "tf_keras.activations",
        "tf_keras.src.activations",
        "tensorflow.keras.activations",
        "tensorflow.python.keras.activations",
    }
)
# Parts of the stored config that ``load_model(..., compile=False)`` never deserialises.
IGNORED_KEYS = frozenset({"compile_config"})
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ModelRejected(ValueError):
    """The uploaded file is not an acceptable model; ``str(exc)`` is the message for the user."""


@dataclass(frozen=True)
class ValidatedModel:
    format: str  # "keras" (Keras 3 archive) or "h5" (legacy HDF5)
    input_size: tuple[int, int]  # (height, width) read from the model
    n_outputs: int
    parameters: int
    sha256: str
    probe_probabilities: list[float]


def validate_model_file(
    path: str | Path,
    *,
    expected_classes: int = 5,
    max_bytes: int = 200 * MIB,
    timeout_s: float = 60.0,
    memory_limit_mb: int = 4096,
    _child_sleep_s: float = 0.0,
) -> ValidatedModel:
    """Vet ``path`` (see the module docstring); raise :class:`ModelRejected` with a user message.

    ``_child_sleep_s`` is a test hook only: the loader process sleeps that long before loading, to
    exercise the time-out with a real process.
    """
    if expected_classes < 2:
        raise ValueError("expected_classes must be at least 2")
    if timeout_s <= 0 or max_bytes <= 0 or memory_limit_mb <= 0:
        raise ValueError("timeout_s, max_bytes and memory_limit_mb must be positive")
    path = Path(path)
    _check_size(path, max_bytes)
    fmt = detect_format(path, max_bytes=max_bytes)
    inspect_architecture(read_model_config(path, fmt))
    report = _load_in_child(
        path,
        fmt,
        expected_classes=expected_classes,
        timeout_s=timeout_s,
        memory_limit_mb=memory_limit_mb,
        sleep_s=_child_sleep_s,
    )
    return ValidatedModel(
        format=fmt,
        input_size=(int(report["input_size"][0]), int(report["input_size"][1])),
        n_outputs=int(report["n_outputs"]),
        parameters=int(report["parameters"]),
        sha256=file_sha256(path),
        probe_probabilities=[float(p) for p in report["probabilities"]],
    )


# --- 1. size ---------------------------------------------------------------------------------------


def _format_mb(n_bytes: float) -> str:
    value = n_bytes / MIB
    if value >= 10:
        return f"{value:.0f}"
    if value >= 0.1:
        return f"{value:.1f}".removesuffix(".0")
    return f"{value:.2g}"


def _check_size(path: Path, max_bytes: int) -> None:
    try:
        if not path.is_file():
            raise ModelRejected("The uploaded model file could not be found.")
        size = path.stat().st_size
    except OSError as exc:
        raise ModelRejected("The uploaded model file could not be read.") from exc
    if size == 0:
        raise ModelRejected("The file is empty.")
    if size > max_bytes:
        raise ModelRejected(
            f"The file is {_format_mb(size)} MB, over the {_format_mb(max_bytes)} MB limit for model files."
        )


# --- 2. format -------------------------------------------------------------------------------------

NOT_A_MODEL = "This is not a Keras model file (.keras archive or HDF5 .h5)."


def detect_format(path: Path, *, max_bytes: int = 200 * MIB) -> str:
    """``"h5"`` or ``"keras"``, from the file's content; :class:`ModelRejected` for anything else."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(HDF5_MAGIC))
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise ModelRejected("The uploaded model file could not be read.") from exc
    if head == HDF5_MAGIC:
        return "h5"
    if not is_zip:
        raise ModelRejected(NOT_A_MODEL)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelRejected(NOT_A_MODEL + " The zip archive is damaged.") from exc
    if "config.json" not in members or "metadata.json" not in members:
        raise ModelRejected(
            NOT_A_MODEL + " The zip archive has no config.json and metadata.json, so it is not a Keras 3 model."
        )
    unpacked = sum(info.file_size for info in members.values())
    if unpacked > ARCHIVE_EXPANSION_FACTOR * max_bytes:
        raise ModelRejected(
            f"The archive unpacks to {_format_mb(unpacked)} MB, more than the "
            f"{_format_mb(ARCHIVE_EXPANSION_FACTOR * max_bytes)} MB allowed."
        )
    return "keras"


# --- 3. architecture, read as JSON and never deserialised -------------------------------------------


def read_model_config(path: Path, fmt: str) -> dict:
    """The stored architecture as plain JSON (``config.json`` of a .keras, ``model_config`` of an .h5)."""
    if fmt == "keras":
        try:
            with zipfile.ZipFile(path) as archive:
                info = archive.getinfo("config.json")
                if info.file_size > MAX_CONFIG_BYTES:
                    raise ModelRejected("The model's config.json is implausibly large.")
                raw: str | bytes = archive.read(info)
        except (zipfile.BadZipFile, KeyError, OSError, RuntimeError, ValueError) as exc:
            if isinstance(exc, ModelRejected):
                raise
            raise ModelRejected("The model archive is damaged: its config.json cannot be read.") from exc
    elif fmt == "h5":
        raw = _read_h5_model_config(path)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ModelRejected("The model's stored architecture is not readable JSON.") from exc
    if not isinstance(config, dict):
        raise ModelRejected("The model's stored architecture is not a model description.")
    return config


def _read_h5_model_config(path: Path) -> str | bytes:
    import h5py  # only needed here; a Keras dependency

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
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelRejected("The model's stored architecture is implausibly large.")
    return raw


def inspect_architecture(config: dict) -> None:
    """Refuse anything but a Functional/Sequential model of allowlisted built-in Keras layers."""
    class_name = config.get("class_name")
    if class_name not in MODEL_CLASSES:
        _check_object(config, "The model")
        raise ModelRejected(
            f"The file holds a {short_text(class_name)} object, not a Functional or Sequential Keras model "
            "built from standard layers."
        )
    try:
        _inspect_layer(config, depth=0)
    except RecursionError as exc:
        raise ModelRejected("The model's architecture is nested too deeply.") from exc


def _layer_name(entry: dict) -> str:
    inner = entry.get("config")
    name = entry.get("name") or (inner.get("name") if isinstance(inner, dict) else None)
    return short_text(name) if name is not None else "(unnamed)"


def short_text(value, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _inspect_layer(entry, depth: int) -> None:
    if depth > MAX_CONFIG_DEPTH:
        raise ModelRejected("The model's architecture is nested too deeply.")
    if not isinstance(entry, dict):
        raise ModelRejected("The model's architecture lists something that is not a layer.")
    name = _layer_name(entry)
    where = f"Layer '{name}'"
    class_name = entry.get("class_name")
    _check_object(entry, where)
    if class_name in CODE_LAYERS:
        raise ModelRejected(f"{where} is a {class_name} layer: arbitrary code is not allowed.")
    if not isinstance(class_name, str) or class_name not in ALLOWED_LAYERS:
        raise ModelRejected(
            f"{where} has class {short_text(class_name)}, which is not one of the built-in Keras layers "
            "allowed on this platform."
        )
    inner = entry.get("config")
    for key, value in entry.items():
        if key in IGNORED_KEYS or key == "config":
            continue
        _scan(value, where, depth + 1)
    if isinstance(inner, dict):
        for key, value in inner.items():
            if key == "layers" and class_name in MODEL_CLASSES:
                if not isinstance(value, list):
                    raise ModelRejected(f"{where} has a malformed list of layers.")
                for sub_entry in value:
                    _inspect_layer(sub_entry, depth + 1)
            elif key not in IGNORED_KEYS:
                _scan(value, where, depth + 1)
    elif inner is not None:
        _scan(inner, where, depth + 1)


def _scan(node, where: str, depth: int) -> None:
    """Check every serialised object nested in a layer's config (initialisers, activations, dtypes, ...)."""
    if depth > MAX_CONFIG_DEPTH:
        raise ModelRejected("The model's architecture is nested too deeply.")
    if isinstance(node, dict):
        if "class_name" in node:
            _check_object(node, where)
        if node.get("class_name") in CODE_LAYERS or node.get("class_name") in MODEL_CLASSES:
            _inspect_layer(node, depth + 1)  # a layer inside a wrapper's config: same rules
            return
        for key, value in node.items():
            if key not in IGNORED_KEYS:
                _scan(value, where, depth + 1)
    elif isinstance(node, list):
        for item in node:
            _scan(item, where, depth + 1)


def _is_keras_module(module: str) -> bool:
    return any(module == root or module.startswith(root + ".") for root in KERAS_MODULE_ROOTS)


def _check_object(node: dict, where: str) -> None:
    """Refuse serialised code, custom registered objects and objects from outside Keras."""
    class_name = node.get("class_name")
    if class_name == "__lambda__" or node.get("function_type") == "lambda" or node.get("output_shape_type") == "lambda":
        raise ModelRejected(f"{where} contains serialised Python code (a lambda): arbitrary code is not allowed.")
    module = node.get("module")
    registered = node.get("registered_name")
    for text in (class_name, registered):
        if isinstance(text, str) and ">" in text:
            raise ModelRejected(
                f"{where} uses the custom object '{short_text(text)}': custom code is not allowed; "
                "use built-in Keras layers only."
            )
    if class_name == "function":
        fn = node.get("config")
        if (
            not isinstance(fn, str)
            or not _IDENTIFIER.match(fn)
            or module not in FUNCTION_MODULES
            or registered not in (None, fn)
        ):
            raise ModelRejected(
                f"{where} refers to the function '{short_text(module)}.{short_text(fn)}', which is not a built-in "
                "Keras activation: custom code is not allowed."
            )
    elif module is not None and (not isinstance(module, str) or not _is_keras_module(module)):
        raise ModelRejected(
            f"{where} uses {short_text(class_name)} from module '{short_text(module)}', which is not part of Keras: "
            "custom code is not allowed."
        )
    elif registered is not None and registered != class_name:
        raise ModelRejected(
            f"{where} uses the custom object '{short_text(registered)}': custom code is not allowed; "
            "use built-in Keras layers only."
        )


# --- 4. loading in a separate process ------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent  # so the child can import wbc_ml (and nothing of Django)


def _load_in_child(
    path: Path, fmt: str, *, expected_classes: int, timeout_s: float, memory_limit_mb: int, sleep_s: float
) -> dict:
    with tempfile.TemporaryDirectory(prefix="wbc-model-check-") as workdir:
        # Keras picks its loader by file extension; give it the one the content says.
        link = Path(workdir) / ("model.keras" if fmt == "keras" else "model.h5")
        try:
            link.symlink_to(path.resolve())
        except OSError:
            import shutil

            shutil.copyfile(path, link)
        request = {
            "path": str(link),
            "expected_classes": expected_classes,
            "memory_limit_mb": memory_limit_mb,
            "sleep_s": float(sleep_s),
        }
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "CUDA_VISIBLE_DEVICES": "-1",  # validation needs no GPU; keep it away from the serving process's
            "TF_NUM_INTRAOP_THREADS": CHILD_THREADS,
            "TF_NUM_INTEROP_THREADS": CHILD_THREADS,
            "OMP_NUM_THREADS": CHILD_THREADS,
            "MALLOC_ARENA_MAX": "2",
            "PYTHONPATH": str(REPO_ROOT),
        }
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "wbc_ml.vetting_child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            start_new_session=True,  # its own process group, killed as a whole on time-out
        )
        try:
            stdout, stderr = process.communicate(json.dumps(request).encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            raise ModelRejected(
                f"Loading the model took longer than {timeout_s:g} s, so it was stopped; "
                "a model for this platform should load in seconds."
            ) from None
        except BaseException:
            _kill_group(process)
            process.communicate()
            raise
    elapsed = time.monotonic() - started
    return _read_child_report(process.returncode, stdout, stderr, memory_limit_mb, elapsed)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the loader's whole process group; only while the loader is not yet reaped (its pid,
    hence the group id, cannot have been reused)."""
    if process.returncode is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_child_report(returncode: int, stdout: bytes, stderr: bytes, memory_limit_mb: int, elapsed: float) -> dict:
    report = None
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    if lines:
        try:
            report = json.loads(lines[-1])
        except ValueError:
            report = None
    if not isinstance(report, dict):
        tail = stderr.decode("utf-8", "replace")[-2000:]
        logger.warning("model loader exited with status %s after %.1f s; stderr tail:\n%s", returncode, elapsed, tail)
        if returncode is not None and returncode < 0:
            try:
                how = f"killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"killed by signal {-returncode}"
        else:
            how = f"exit status {returncode}"
        raise ModelRejected(
            f"The model loader crashed ({how}) before finishing. The model may need more than the "
            f"{memory_limit_mb} MB of memory allowed for checking it, or the file is damaged."
        )
    if "refused" in report:
        raise ModelRejected(str(report["refused"]))
    if "error" in report:
        raise ModelRejected(f"Keras could not load the model: {report['error']}")
    return report
