import logging

import numpy as np
import pytest

from classifier.registry import ensure_onnx
from tests.conftest import TINY_SIZE, image_bytes
from wbc_ml.checksums import file_sha256
from wbc_ml.inference import KerasBackend, ModelUnavailable, OnnxBackend, get_classifier
from wbc_ml.onnx_export import probe_batch
from wbc_ml.preprocessing import load_pixels


def _pixels(n=6):
    return np.stack([load_pixels(image_bytes(color=(30 * i, 120, 200 - 20 * i)), TINY_SIZE) for i in range(n)])


def test_registered_model_is_converted_and_served_by_onnx_runtime(tiny_record, settings, tmp_path):
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    ensure_onnx(tiny_record)
    tiny_record.refresh_from_db()
    assert tiny_record.onnx_file_name and tiny_record.onnx_status.startswith("ONNX Runtime")
    onnx = settings.WBC_ONNX_DIR / tiny_record.onnx_file_name
    assert onnx.is_file() and tiny_record.onnx_sha256 == file_sha256(onnx)
    onnx_classifier = get_classifier(tiny_record.spec())
    assert isinstance(onnx_classifier.backend, OnnxBackend)


def test_onnx_and_tensorflow_agree_within_1e_4(tiny_record, settings, tmp_path):
    tf_probs = [r.probabilities for r in get_classifier(tiny_record.spec()).predict(_pixels())]
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    ensure_onnx(tiny_record)
    onnx_classifier = get_classifier(tiny_record.spec())
    assert isinstance(onnx_classifier.backend, OnnxBackend)
    onnx_probs = [r.probabilities for r in onnx_classifier.predict(_pixels())]
    assert np.abs(np.array(onnx_probs) - np.array(tf_probs)).max() <= 1e-4


def test_tensorflow_serves_when_there_is_no_onnx_copy(tiny_record):
    assert isinstance(get_classifier(tiny_record.spec()).backend, KerasBackend)


def test_an_altered_onnx_file_is_refused_not_served(tiny_record, settings, tmp_path):
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    ensure_onnx(tiny_record)
    tiny_record.refresh_from_db()
    (settings.WBC_ONNX_DIR / tiny_record.onnx_file_name).write_bytes(b"not onnx")
    with pytest.raises(ModelUnavailable, match=r"ONNX copy .* does not match its registered checksum"):
        get_classifier(tiny_record.spec())


def test_a_missing_onnx_file_falls_back_to_tensorflow_with_a_logged_reason(tiny_record, settings, tmp_path, caplog):
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    ensure_onnx(tiny_record)
    tiny_record.refresh_from_db()
    (settings.WBC_ONNX_DIR / tiny_record.onnx_file_name).unlink()
    with caplog.at_level(logging.WARNING):
        classifier = get_classifier(tiny_record.spec())
    assert isinstance(classifier.backend, KerasBackend)
    assert "serving" in caplog.text and "with TensorFlow" in caplog.text
    assert len(classifier.predict(_pixels(2))) == 2


def test_failed_conversion_is_recorded_and_tensorflow_serves(tiny_record, settings, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the ONNX folder should be")
    settings.WBC_ONNX_DIR = blocker / "onnx"  # the export cannot be written: a real conversion failure
    with caplog.at_level(logging.WARNING):
        ensure_onnx(tiny_record)
    tiny_record.refresh_from_db()
    assert tiny_record.onnx_file_name == tiny_record.onnx_sha256 == ""
    assert tiny_record.onnx_status.startswith("TensorFlow fallback")
    assert "serving with TensorFlow" in caplog.text
    assert isinstance(get_classifier(tiny_record.spec()).backend, KerasBackend)


def test_probe_batch_is_deterministic_and_normalised():
    a = probe_batch((8, 8), {"method": "scale01"})
    b = probe_batch((8, 8), {"method": "scale01"})
    np.testing.assert_array_equal(a, b)
    assert a.shape == (8, 8, 8, 3) and 0.0 <= a.min() and a.max() <= 1.0


def test_a_copy_exported_before_maps_still_serves_its_saliency_comes_from_tensorflow_and_it_is_exported_again(
    tiny_record, technologist, settings, tmp_path
):
    """A copy of the previous layout (features and probabilities, no metadata) keeps serving the same results; its
    Grad-CAM is made by TensorFlow (the sandboxed child), and registration exports a copy with maps."""
    from classifier.services import UploadedImage, classify_image, ensure_saliency
    from wbc_ml.inference import load_keras_model, serving_model
    from wbc_ml.onnx_export import SERVING_LAYOUT

    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    settings.WBC_ONNX_DIR.mkdir()
    old = settings.WBC_ONNX_DIR / f"{tiny_record.sha256[:20]}-{tiny_record.pk}-f2.onnx"
    previous_layout = serving_model(load_keras_model(tiny_record.path))
    previous_layout.predict_on_batch(probe_batch(TINY_SIZE, tiny_record.normalization))  # Keras exports called models
    previous_layout.export(str(old), format="onnx", verbose=False)
    tiny_record.onnx_file_name, tiny_record.onnx_sha256 = old.name, file_sha256(old)
    tiny_record.save()
    classifier = get_classifier(tiny_record.spec())
    assert classifier.backend.roles == ("features", "probabilities") and not classifier.has_gradcam
    assert classifier.backend.run(classifier.prepare(_pixels(2)))[1].shape == (2, 32)  # detector features: 16 + 16
    results = classifier.predict(_pixels(3))
    assert all(r.gradcam_raw is None for r in results)

    prediction = classify_image(technologist, UploadedImage("cell.png", image_bytes(size=(50, 40))), tiny_record)
    field = ensure_saliency(prediction, "gradcam")  # not served by TensorFlow here: the sandboxed child makes it
    assert field.name.endswith(".webp")

    ensure_onnx(tiny_record)
    tiny_record.refresh_from_db()
    assert tiny_record.onnx_file_name.endswith(f"-{SERVING_LAYOUT}.onnx") and tiny_record.onnx_file_name != old.name
    renewed = get_classifier(tiny_record.spec())
    assert renewed.backend.roles == ("features", "probabilities", "gradcam") and renewed.has_gradcam
    np.testing.assert_allclose(
        [r.probabilities for r in renewed.predict(_pixels(3))], [r.probabilities for r in results], atol=1e-6
    )
