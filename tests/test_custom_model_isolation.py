"""A lab's uploaded model is never loaded with Keras in the web process: it is served only by the ONNX copy the
vetting child made (an upload the child cannot export is refused), and its saliency maps are made in a sandboxed
child process that checks the file's sha256 itself."""

import gc
import io
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from PIL import Image

from classifier.models import ClassifierModel, Prediction
from tests.conftest import image_bytes
from wbc_ml.inference import ModelUnavailable, OnnxBackend, get_classifier
from wbc_ml.saliency_child import saliency_in_sandbox

REPO = Path(__file__).resolve().parent.parent
PROBE = "isolation_probe"  # every layer of the uploaded model is named with this, so its Keras objects can be found

# Built in a separate process, so that no Keras object of the uploaded model ever exists in this one before the test.
BUILD_SCRIPT = """
import sys
from pathlib import Path
import keras

def build(path, seed, resize=None):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(32, 32, 3), name="PROBE_input")
    x = inputs if resize is None else keras.layers.Resizing(24, 24, interpolation=resize, name="PROBE_resize")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="PROBE_conv_a")(x)
    x = keras.layers.MaxPooling2D(2, name="PROBE_pool")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="PROBE_conv_last")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="PROBE_probabilities")(x)
    keras.Model(inputs, outputs, name="PROBE_model").save(path)

folder = Path(sys.argv[1])
build(folder / "isolated.keras", seed=21)
build(folder / "other.keras", seed=22)
# Lanczos resizing is a built-in layer that passes every other check, but ONNX Runtime cannot run its export.
build(folder / "lanczos.keras", seed=23, resize="lanczos3")
""".replace("PROBE", PROBE)


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    done = subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, str(folder)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {path.name: path for path in folder.iterdir()}


@pytest.fixture
def admin_client(client, model_admin, settings, tmp_path):
    settings.WBC_CUSTOM_MODELS_DIR = tmp_path / "custom"
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    client.force_login(model_admin)
    return client


def _upload(client, path: Path):
    return client.post(
        reverse("classifier:model_upload"),
        {
            "name": "Lab CNN",
            "class_order": "basophil, eosinophil, lymphocyte, monocyte, neutrophil",
            "normalization": "scale01",
            "file": SimpleUploadedFile("model.keras", path.read_bytes()),
        },
    )


def _classify(client, record) -> Prediction:
    upload = SimpleUploadedFile("cell.png", image_bytes(size=(72, 64)), content_type="image/png")
    response = client.post(reverse("classifier:classify"), {"image": upload, "model": record.pk})
    assert response.status_code == 302, response.content[-2000:]
    return Prediction.objects.get(model=record)


def _keras_objects_of_the_upload() -> list[str]:
    """Names of the live Keras layers and models in this process that come from the uploaded file."""
    import keras

    gc.collect()
    return [
        obj.name
        for obj in gc.get_objects()
        # type() first: a dead weak proxy from another test raises on isinstance() and attribute access
        if type(obj) not in weakref.ProxyTypes
        and isinstance(obj, keras.layers.Layer)
        and str(getattr(obj, "name", "")).startswith(PROBE)
    ]


def _files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def test_an_upload_the_child_cannot_export_to_onnx_is_refused_and_nothing_is_stored(
    admin_client, model_files, settings
):
    response = _upload(admin_client, model_files["lanczos.keras"])
    assert response.status_code == 400
    text = response.content.decode()
    assert "could not be converted to ONNX for serving" in text
    assert "only served through a checked ONNX copy, so it was not stored" in text
    assert not ClassifierModel.objects.filter(is_bundled=False).exists()
    assert _files_under(Path(settings.WBC_CUSTOM_MODELS_DIR)) == []
    assert _files_under(Path(settings.WBC_ONNX_DIR)) == []
    # the same lab can upload a model the child can export: the refusal was about the export, not the lab
    assert _upload(admin_client, model_files["isolated.keras"]).status_code == 302


def test_a_custom_model_classifies_and_gets_both_saliency_maps_without_keras_in_this_process(
    admin_client, model_files, lab_a
):
    assert _upload(admin_client, model_files["isolated.keras"]).status_code == 302
    record = ClassifierModel.objects.get(laboratory=lab_a, is_bundled=False)
    assert record.onnx_sha256 and not record.spec().allow_keras_fallback
    prediction = _classify(admin_client, record)
    original = Image.open(io.BytesIO(image_bytes(size=(72, 64)))).convert("RGB")
    maps = {}
    for method in ("gradcam", "gradient"):
        response = admin_client.get(reverse("classifier:saliency", args=[prediction.uid, method]))
        assert response.status_code == 200, response.content[-1000:]
        assert response["Content-Type"] == "image/webp"
        overlay = Image.open(io.BytesIO(b"".join(response.streaming_content)))
        assert overlay.format == "WEBP" and overlay.size == original.size
        maps[method] = np.asarray(overlay.convert("RGB"), np.int16)
        assert np.abs(maps[method] - np.asarray(original, np.int16)).mean() > 5  # a heatmap was blended in
    assert np.abs(maps["gradcam"] - maps["gradient"]).mean() > 1  # two different maps
    prediction.refresh_from_db()
    assert prediction.gradcam and prediction.gradient  # stored, not made again

    cached = get_classifier(record.spec())  # the classifier the page used, from this process's cache
    assert isinstance(cached.backend, OnnxBackend)
    assert not cached.loaded.holds_keras_model
    assert _keras_objects_of_the_upload() == []
    with pytest.raises(ModelUnavailable, match=r"never loaded with Keras in this process"):
        _ = cached.model
    # The observable above does see the model when this process loads it with Keras (as for a bundled model).
    in_process = get_classifier(replace(record.spec(), allow_keras_fallback=True, onnx_path=None))
    assert in_process.model is not None and f"{PROBE}_conv_last" in _keras_objects_of_the_upload()


def test_a_custom_model_without_its_onnx_copy_is_unavailable_not_loaded_with_keras(admin_client, model_files, lab_a):
    assert _upload(admin_client, model_files["isolated.keras"]).status_code == 302
    record = ClassifierModel.objects.get(laboratory=lab_a, is_bundled=False)
    record.spec().onnx_path.unlink()
    upload = SimpleUploadedFile("cell.png", image_bytes(), content_type="image/png")
    response = admin_client.post(reverse("classifier:classify"), {"image": upload, "model": record.pk})
    assert response.status_code == 503
    assert "only served through its checked ONNX copy" in response.content.decode()
    assert not Prediction.objects.exists()
    assert _keras_objects_of_the_upload() == []


def test_the_saliency_child_refuses_a_model_file_whose_sha256_differs_from_the_record(admin_client, model_files, lab_a):
    assert _upload(admin_client, model_files["isolated.keras"]).status_code == 302
    record = ClassifierModel.objects.get(laboratory=lab_a, is_bundled=False)
    prediction = _classify(admin_client, record)
    record.path.write_bytes(model_files["other.keras"].read_bytes())  # a valid model, but not the registered one
    # the input-gradient map needs the model file itself (Grad-CAM comes from the checked ONNX copy)
    response = admin_client.get(reverse("classifier:saliency", args=[prediction.uid, "gradient"]))
    assert response.status_code == 503
    assert "does not match its registered checksum" in response.content.decode()
    prediction.refresh_from_db()
    assert not prediction.gradient
    with pytest.raises(ModelUnavailable, match=r"does not match its registered checksum"):
        saliency_in_sandbox(record.spec(), image_bytes(), class_index=0, method="gradcam")
