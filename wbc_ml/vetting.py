"""Vetting a user-uploaded Keras model file before anything is stored or activated.

``validate_model_file(path)`` either returns a :class:`ValidatedModel` or raises :class:`ModelRejected`,
whose ``str()`` is a plain sentence for the person who uploaded the file. The checks run cheapest
first, so most bad uploads are refused without ever starting TensorFlow:

1. size: an empty file, or one over ``max_bytes``, is refused;
2. format, read from the content (the file name is ignored): HDF5 signature -> ``"h5"`` (legacy
   Keras 2 / tf.keras), a zip holding ``config.json`` and ``metadata.json`` -> ``"keras"`` (Keras 3);
3. the stored architecture is read as plain JSON (never deserialised) and walked, nested models
   included: every serialised object must be an exact (module, class) pair on :data:`ALLOWED_OBJECTS`
   (built-in layers, initialisers, regularisers, constraints, dtype policies; and, inside a *nested*
   model's ``compile_config``, which Keras deserialises even with ``compile=False``, built-in
   optimisers, schedules, losses and metrics), every function an exact pair on
   :data:`ALLOWED_FUNCTIONS`. Lambda-style layers, serialised Python code, custom registered objects and
   anything else (``keras.utils.get_file``, ``keras.config.enable_unsafe_deserialization``, ...) are
   refused by name. Only the top-level ``compile_config`` is skipped: ``load_model(..., compile=False)``
   drops it. A ``.keras`` archive's ``config.json`` is walked here (zip + JSON, pure Python); an HDF5
   file is never parsed in the calling process: the child reads it with h5py and walks it first;
4. the model is loaded in a separate, short-lived Python process (``keras.models.load_model(...,
   compile=False, safe_mode=True)``) under a wall-clock time-out and resource limits; there it must
   take one ``(None, H, W, 3)`` image input and give one ``(None, expected_classes)`` output, and its
   prediction on a fixed probe image must be a probability vector. When asked (``onnx_path``), the same
   child exports the ONNX copy used for serving and checks it against TensorFlow, so the uploaded file
   is never loaded by Keras in the web process;
5. the file's SHA-256 (and the ONNX copy's) is recorded.

Only the standard library is imported here at module level. TensorFlow/Keras, h5py and the ONNX tools
are only ever imported inside the child process.

The child is ``python -m wbc_ml.vetting_child`` (:mod:`wbc_ml.vetting_child`; ``wbc_ml`` imports no
Django): it reads a JSON request on stdin and writes one JSON line back on its original stdout (anything
TensorFlow prints is redirected to stderr). It runs in the sandbox of :mod:`wbc_ml.sandbox` (shared with the
saliency child): a scrubbed environment and an empty temporary home, no network where the host allows
``unshare -n`` (else a logged warning; the architecture walk above has already refused every object that could
reach the network), its own process group killed on time-out, and memory, CPU, file-size and open-file limits
(TensorFlow itself needs roughly 0.5 GB of the memory allowance).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import sandbox
from .checksums import file_sha256
from .sandbox import MIB, SandboxCrashed, SandboxTimeout, run_child

logger = logging.getLogger(__name__)

# The sandbox's settings, named here too: the vetting child and the tests read them from this module.
ADDRESS_SPACE_HEADROOM_MB = sandbox.ADDRESS_SPACE_HEADROOM_MB
CHILD_ENV_NAMES = sandbox.CHILD_ENV_NAMES
CHILD_MAX_OPEN_FILES = sandbox.CHILD_MAX_OPEN_FILES
CHILD_MAX_WRITTEN_MB = sandbox.CHILD_MAX_WRITTEN_MB
REPO_ROOT = sandbox.REPO_ROOT
child_environment = sandbox.child_environment
network_isolation = sandbox.network_isolation

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
MIN_INPUT_SIDE = 16
PROBABILITY_TOLERANCE = 1e-4  # each output within [0 - tol, 1 + tol]
SUM_TOLERANCE = 1e-3  # outputs sum to 1 within this
PROBE_SEED = 0
MAX_CONFIG_BYTES = 32 * MIB  # an architecture description is kilobytes; refuse absurd ones
MAX_CONFIG_DEPTH = 400  # nesting depth of the JSON walk (nested models add a few levels each)
ARCHIVE_EXPANSION_FACTOR = 4  # a .keras archive may unpack to at most this multiple of max_bytes
CHILD_ONNX_NAME = "model.onnx"  # written by the child in its working directory, then moved by the caller

# --- what a stored architecture may contain: exact (module, class) pairs ------------------------------

MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})
MODEL_OBJECTS = frozenset(
    {
        ("keras.src.models.functional", "Functional"),
        ("keras", "Functional"),
        ("keras", "Sequential"),
        ("keras.src.models.sequential", "Sequential"),
        ("keras", "Model"),
        ("keras.src.models.model", "Model"),
    }
)
# Built-in layer classes accepted anywhere in the architecture (the usual CNN building blocks).
LAYER_CLASSES = frozenset(
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
    }
)
ALLOWED_LAYERS = LAYER_CLASSES | MODEL_CLASSES
INITIALIZERS = (
    "Constant GlorotNormal GlorotUniform HeNormal HeUniform Identity LecunNormal LecunUniform Ones Orthogonal "
    "RandomNormal RandomUniform TruncatedNormal VarianceScaling Zeros"
).split()
REGULARIZERS = "L1 L2 L1L2 OrthogonalRegularizer".split()
CONSTRAINTS = "MaxNorm MinMaxNorm NonNeg UnitNorm".split()
# Only ever inside a nested model's compile_config:
OPTIMIZERS = "Adadelta Adafactor Adagrad Adam AdamW Adamax Ftrl Lamb Lion Nadam RMSprop SGD".split()
LR_SCHEDULES = (
    "CosineDecay CosineDecayRestarts ExponentialDecay InverseTimeDecay PiecewiseConstantDecay PolynomialDecay"
).split()
LOSSES = (
    "BinaryCrossentropy BinaryFocalCrossentropy CategoricalCrossentropy CategoricalFocalCrossentropy "
    "CategoricalHinge Hinge Huber KLDivergence LogCosh MeanAbsoluteError MeanAbsolutePercentageError "
    "MeanSquaredError MeanSquaredLogarithmicError Poisson SparseCategoricalCrossentropy SquaredHinge"
).split()
METRICS = (
    "AUC Accuracy BinaryAccuracy CategoricalAccuracy F1Score FBetaScore Mean Precision Recall "
    "SparseCategoricalAccuracy SparseTopKCategoricalAccuracy TopKCategoricalAccuracy"
).split()


def _pairs(module: str, names) -> set[tuple[str, str]]:
    return {(module, name) for name in names}


ALLOWED_OBJECTS = frozenset(
    MODEL_OBJECTS
    | _pairs("keras.layers", LAYER_CLASSES)
    | _pairs("keras.initializers", INITIALIZERS)
    | _pairs("keras.regularizers", REGULARIZERS)
    | _pairs("keras.constraints", CONSTRAINTS)
    | _pairs("keras", ("DTypePolicy", "FloatDTypePolicy"))
    | _pairs("keras.dtype_policies", ("DTypePolicy", "FloatDTypePolicy"))
    | _pairs("keras.optimizers", OPTIMIZERS)
    | _pairs("keras.optimizers.schedules", LR_SCHEDULES)
    | _pairs("keras.losses", LOSSES)
    | _pairs("keras.metrics", METRICS)
)
# Objects written without a module (Keras' own markers; legacy HDF5 configs name classes only).
MARKER_OBJECTS = frozenset(
    {"__keras_tensor__", "__tuple__", "__numpy__", "__tensor__", "__bytes__", "__slice__", "__ellipsis__"}
)
NAMES_WITHOUT_MODULE = frozenset({name for _module, name in ALLOWED_OBJECTS} | MARKER_OBJECTS | {"Policy"})
# Layers that wrap arbitrary Python (or raw TensorFlow) code; named specially in the refusal.
CODE_LAYERS = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda"})
# Functions referenced by name: Keras' own activations, losses and metrics, by exact (module, name).
ACTIVATIONS = (
    "celu elu exponential gelu glu hard_shrink hard_sigmoid hard_silu hard_swish hard_tanh leaky_relu linear "
    "log_sigmoid log_softmax mish relu relu6 selu sigmoid silu soft_shrink softmax softplus softsign sparse_plus "
    "sparsemax squareplus swish tanh tanh_shrink"
).split()
LOSS_FUNCTIONS = (
    "binary_crossentropy binary_focal_crossentropy categorical_crossentropy categorical_focal_crossentropy "
    "categorical_hinge hinge huber kl_divergence log_cosh mean_absolute_error mean_absolute_percentage_error "
    "mean_squared_error mean_squared_logarithmic_error poisson sparse_categorical_crossentropy squared_hinge"
).split()
METRIC_FUNCTIONS = (
    "binary_accuracy categorical_accuracy sparse_categorical_accuracy sparse_top_k_categorical_accuracy "
    "top_k_categorical_accuracy"
).split()
ALLOWED_FUNCTIONS = frozenset(
    {
        (module, name)
        for modules, names in (
            (
                (
                    "keras.activations",
                    "keras.src.activations",
                    "keras.src.activations.activations",
                    "tf_keras.activations",
                    "tensorflow.keras.activations",
                ),
                ACTIVATIONS,
            ),
            (("keras.losses", "keras.src.losses.losses"), LOSS_FUNCTIONS),
            (("keras.metrics", "keras.src.metrics.accuracy_metrics"), METRIC_FUNCTIONS),
        )
        for module in modules
        for name in names
    }
)
KERAS_MODULE_ROOTS = ("keras", "tf_keras", "tf.keras", "tensorflow.keras", "tensorflow.python.keras")


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
    onnx_sha256: str | None = None  # the ONNX copy written to ``onnx_path``, when one was asked for and agreed
    onnx_status: str = ""  # how the model will be served, in words


def validate_model_file(
    path: str | Path,
    *,
    expected_classes: int = 5,
    max_bytes: int = 200 * MIB,
    timeout_s: float = 60.0,
    memory_limit_mb: int = 4096,
    onnx_path: Path | None = None,
    normalization: dict | None = None,
    _child_sleep_s: float = 0.0,
) -> ValidatedModel:
    """Vet ``path`` (see the module docstring); raise :class:`ModelRejected` with a user message.

    With ``onnx_path``, the child also exports the ONNX copy for serving (probe batch normalised with
    ``normalization``); it is written there only when ONNX Runtime and TensorFlow agree. A failed export
    is no refusal: ``onnx_sha256`` is then None and ``onnx_status`` says why TensorFlow serves.

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
    if fmt == "keras":
        inspect_architecture(read_keras_config(path))  # an HDF5 file is walked by the child
    report = _load_in_child(
        path,
        fmt,
        expected_classes=expected_classes,
        timeout_s=timeout_s,
        memory_limit_mb=memory_limit_mb,
        sleep_s=_child_sleep_s,
        inspect=fmt == "h5",
        onnx_path=onnx_path,
        normalization=normalization,
    )
    return ValidatedModel(
        format=fmt,
        input_size=(int(report["input_size"][0]), int(report["input_size"][1])),
        n_outputs=int(report["n_outputs"]),
        parameters=int(report["parameters"]),
        sha256=file_sha256(path),
        probe_probabilities=[float(p) for p in report["probabilities"]],
        onnx_sha256=report.get("onnx_sha256"),
        onnx_status=str(report.get("onnx_status", "")),
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


def read_keras_config(path: Path) -> dict:
    """The stored architecture of a .keras archive (its ``config.json``) as plain JSON."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("config.json")
            if info.file_size > MAX_CONFIG_BYTES:
                raise ModelRejected("The model's config.json is implausibly large.")
            raw = archive.read(info)
    except (zipfile.BadZipFile, KeyError, OSError, RuntimeError, ValueError) as exc:
        if isinstance(exc, ModelRejected):
            raise
        raise ModelRejected("The model archive is damaged: its config.json cannot be read.") from exc
    return parse_config(raw)


def parse_config(raw: str | bytes) -> dict:
    """Stored architecture text -> dict, or :class:`ModelRejected`."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelRejected("The model's stored architecture is implausibly large.")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ModelRejected("The model's stored architecture is not readable JSON.") from exc
    if not isinstance(config, dict):
        raise ModelRejected("The model's stored architecture is not a model description.")
    return config


def inspect_architecture(config: dict) -> None:
    """Refuse anything but a Functional/Sequential model of allowlisted built-in Keras objects."""
    class_name = config.get("class_name")
    if class_name not in MODEL_CLASSES:
        _check_object(config, "The model")
        raise ModelRejected(
            f"The file holds a {short_text(class_name)} object, not a Functional or Sequential Keras model "
            "built from standard layers."
        )
    try:
        _inspect_layer(config, depth=0, top_level=True)
    except RecursionError as exc:
        raise ModelRejected("The model's architecture is nested too deeply.") from exc


def _layer_name(entry: dict) -> str:
    inner = entry.get("config")
    name = entry.get("name") or (inner.get("name") if isinstance(inner, dict) else None)
    return short_text(name) if name is not None else "(unnamed)"


def short_text(value, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _inspect_layer(entry, depth: int, top_level: bool = False) -> None:
    if depth > MAX_CONFIG_DEPTH:
        raise ModelRejected("The model's architecture is nested too deeply.")
    if not isinstance(entry, dict):
        raise ModelRejected("The model's architecture lists something that is not a layer.")
    name = _layer_name(entry)
    where = f"Layer '{name}'"
    class_name = entry.get("class_name")
    _check_code(entry, where)
    if class_name in CODE_LAYERS:
        raise ModelRejected(f"{where} is a {class_name} layer: arbitrary code is not allowed.")
    if not isinstance(class_name, str) or class_name not in ALLOWED_LAYERS:
        raise ModelRejected(
            f"{where} has class {short_text(class_name)}, which is not one of the built-in Keras layers "
            "allowed on this platform."
        )
    _check_object(entry, where)
    inner = entry.get("config")
    for key, value in entry.items():
        if key == "config" or (key == "compile_config" and top_level):
            continue  # load_model(..., compile=False) drops only the top-level compile_config
        if key == "compile_config":  # a nested model's: Keras deserialises it on load
            _scan(value, f"Nested model '{name}' (its saved compile settings)", depth + 1)
        else:
            _scan(value, where, depth + 1)
    if isinstance(inner, dict):
        for key, value in inner.items():
            if key == "layers" and class_name in MODEL_CLASSES:
                if not isinstance(value, list):
                    raise ModelRejected(f"{where} has a malformed list of layers.")
                for sub_entry in value:
                    _inspect_layer(sub_entry, depth + 1)
            else:
                _scan(value, where, depth + 1)
    elif inner is not None:
        _scan(inner, where, depth + 1)


def _scan(node, where: str, depth: int) -> None:
    """Check every serialised object nested in a layer's config (initialisers, activations, dtypes, ...)."""
    if depth > MAX_CONFIG_DEPTH:
        raise ModelRejected("The model's architecture is nested too deeply.")
    if isinstance(node, dict):
        if node.get("class_name") in CODE_LAYERS or node.get("class_name") in MODEL_CLASSES:
            _inspect_layer(node, depth + 1)  # a layer inside a wrapper's config: same rules
            return
        if "class_name" in node:
            _check_code(node, where)
            _check_object(node, where)
        for value in node.values():
            _scan(value, where, depth + 1)
    elif isinstance(node, list):
        for item in node:
            _scan(item, where, depth + 1)


def _check_code(node: dict, where: str) -> None:
    """Refuse serialised Python code and custom registered objects, whatever their module says."""
    class_name = node.get("class_name")
    if class_name == "__lambda__" or node.get("function_type") == "lambda" or node.get("output_shape_type") == "lambda":
        raise ModelRejected(f"{where} contains serialised Python code (a lambda): arbitrary code is not allowed.")
    for text in (class_name, node.get("registered_name")):
        if isinstance(text, str) and ">" in text:
            raise ModelRejected(
                f"{where} uses the custom object '{short_text(text)}': custom code is not allowed; "
                "use built-in Keras layers only."
            )


def _is_keras_module(module: str) -> bool:
    return any(module == root or module.startswith(root + ".") for root in KERAS_MODULE_ROOTS)


def _check_object(node: dict, where: str) -> None:
    """Only exact (module, class) pairs of built-in Keras objects, and exact built-in functions."""
    _check_code(node, where)
    class_name = node.get("class_name")
    module = node.get("module")
    registered = node.get("registered_name")
    if class_name == "function":
        fn = node.get("config")
        if not isinstance(fn, str) or (module, fn) not in ALLOWED_FUNCTIONS or registered not in (None, fn):
            raise ModelRejected(
                f"{where} refers to the function '{short_text(module)}.{short_text(fn)}', which is not a built-in "
                "Keras activation, loss or metric: custom code is not allowed."
            )
        return
    if module is None:
        if class_name not in NAMES_WITHOUT_MODULE:
            raise ModelRejected(
                f"{where} uses {short_text(class_name)}, which is not one of the built-in Keras objects allowed on "
                "this platform: custom code is not allowed."
            )
    elif not isinstance(module, str) or not _is_keras_module(module):
        raise ModelRejected(
            f"{where} uses {short_text(class_name)} from module '{short_text(module)}', which is not part of Keras: "
            "custom code is not allowed."
        )
    elif (module, class_name) not in ALLOWED_OBJECTS:
        raise ModelRejected(
            f"{where} uses {short_text(class_name)} from module '{short_text(module)}', which is not one of the "
            "built-in Keras objects allowed on this platform."
        )
    if registered is not None and registered != class_name:
        raise ModelRejected(
            f"{where} uses the custom object '{short_text(registered)}': custom code is not allowed; "
            "use built-in Keras layers only."
        )


# --- 4. the child process, in the sandbox of :mod:`wbc_ml.sandbox` ----------------------------------------

CHILD_MODULE = "wbc_ml.vetting_child"


def describe_sandbox(*, connect_port: int | None = None, memory_limit_mb: int = 4096, timeout_s: float = 60) -> dict:
    """What the child sees (environment, working directory, limits, and whether it reaches 127.0.0.1:port).

    For tests and operators: it starts the child exactly as :func:`validate_model_file` does.
    """
    with tempfile.TemporaryDirectory(prefix="wbc-model-check-") as workdir:
        request = {"action": "describe", "connect_port": connect_port}
        return _run_child(request, Path(workdir), timeout_s=timeout_s, memory_limit_mb=memory_limit_mb)


def _load_in_child(
    path: Path,
    fmt: str,
    *,
    expected_classes: int,
    timeout_s: float,
    memory_limit_mb: int,
    sleep_s: float,
    inspect: bool = True,
    onnx_path: Path | None = None,
    normalization: dict | None = None,
) -> dict:
    with tempfile.TemporaryDirectory(prefix="wbc-model-check-") as tmp:
        workdir = Path(tmp)
        # Keras picks its loader by file extension; give it the one the content says.
        link = workdir / ("model.keras" if fmt == "keras" else "model.h5")
        try:
            link.symlink_to(path.resolve())
        except OSError:
            shutil.copyfile(path, link)
        request = {
            "action": "vet",
            "path": str(link),
            "format": fmt,
            "inspect": inspect,
            "expected_classes": expected_classes,
            "sleep_s": float(sleep_s),
            "onnx": None if onnx_path is None else {"normalization": normalization or {"method": "scale01"}},
        }
        report = _run_child(request, workdir, timeout_s=timeout_s, memory_limit_mb=memory_limit_mb)
        if onnx_path is not None:
            report["onnx_sha256"] = _take_onnx_copy(workdir / CHILD_ONNX_NAME, onnx_path, report)
    return report


def _take_onnx_copy(written: Path, target: Path, report: dict) -> str | None:
    """Move the child's ONNX copy to ``target`` (a regular file only, never a link); its sha256, or None."""
    if not report.get("onnx_written"):
        return None
    if written.is_symlink() or not written.is_file():
        report["onnx_status"] = "TensorFlow fallback: the ONNX export left no regular file"
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(written, "rb") as source, open(target, "xb") as out:
        shutil.copyfileobj(source, out)
    return file_sha256(target)


def _run_child(request: dict, workdir: Path, *, timeout_s: float, memory_limit_mb: int) -> dict:
    try:
        report = run_child(CHILD_MODULE, request, workdir, timeout_s=timeout_s, memory_limit_mb=memory_limit_mb)
    except SandboxTimeout:
        raise ModelRejected(
            f"Loading the model took longer than {timeout_s:g} s, so it was stopped; "
            "a model for this platform should load in seconds."
        ) from None
    except SandboxCrashed as exc:
        raise ModelRejected(
            f"The model loader crashed ({exc.how}) before finishing. The model may need more than the "
            f"{memory_limit_mb} MB of memory allowed for checking it, or the file is damaged."
        ) from None
    if "refused" in report:
        raise ModelRejected(str(report["refused"]))
    if "error" in report:
        raise ModelRejected(f"Keras could not load the model: {report['error']}")
    return report
