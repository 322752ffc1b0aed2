import numpy as np
import pytest

from tests.conftest import TINY_SIZE, image_bytes
from wbc_ml.inference import ModelUnavailable, get_classifier
from wbc_ml.metrics import apply_temperature
from wbc_ml.preprocessing import load_pixels


def test_tiny_model_gives_a_probability_per_class(tiny_record):
    classifier = get_classifier(tiny_record.spec())
    pixels = np.stack([load_pixels(image_bytes(color=c), TINY_SIZE) for c in [(200, 40, 40), (40, 40, 200)]])
    results = classifier.predict(pixels)
    assert len(results) == 2
    for result in results:
        assert result.probabilities.shape == (5,)
        assert np.isclose(result.probabilities.sum(), 1.0)
        assert result.confidence == pytest.approx(result.probabilities.max())
        assert result.class_index == int(result.probabilities.argmax())
    assert not np.allclose(results[0].probabilities, results[1].probabilities)


def test_batched_and_single_predictions_agree(tiny_record):
    classifier = get_classifier(tiny_record.spec())
    pixels = np.stack([load_pixels(image_bytes(color=(i * 20, 90, 200 - i * 15)), TINY_SIZE) for i in range(5)])
    batched = [r.probabilities for r in classifier.predict(pixels, batch_size=4)]
    single = [classifier.predict(p[None])[0].probabilities for p in pixels]
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_model_loads_once_per_process(tiny_record):
    assert get_classifier(tiny_record.spec()).loaded is get_classifier(tiny_record.spec()).loaded


def test_temperature_is_applied(tiny_record):
    pixels = load_pixels(image_bytes(), TINY_SIZE)[None]
    plain = get_classifier(tiny_record.spec()).predict(pixels)[0].probabilities
    tiny_record.temperature = 2.0
    warm = get_classifier(tiny_record.spec()).predict(pixels)[0].probabilities
    np.testing.assert_allclose(warm, apply_temperature(plain, 2.0), atol=1e-6)
    assert warm.max() < plain.max()


def test_missing_model_file_is_a_clear_error(tiny_record, models_dir):
    (models_dir / "tiny.keras").unlink()
    with pytest.raises(ModelUnavailable, match="missing"):
        get_classifier(tiny_record.spec())


def test_altered_model_file_is_refused(tiny_record, models_dir):
    with open(models_dir / "tiny.keras", "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ModelUnavailable, match="checksum"):
        get_classifier(tiny_record.spec())


def test_unloadable_model_file_is_a_clear_error(tiny_record, models_dir):
    from wbc_ml.checksums import file_sha256

    (models_dir / "tiny.keras").write_bytes(b"PK\x03\x04 not really a keras archive")
    tiny_record.sha256 = file_sha256(models_dir / "tiny.keras")
    with pytest.raises(ModelUnavailable, match="could not be loaded"):
        get_classifier(tiny_record.spec())


def test_temperature_scaling_maths():
    probs = np.array([[0.7, 0.2, 0.1]])
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs)
    scaled = apply_temperature(probs, 2.0)
    expected = np.sqrt(probs) / np.sqrt(probs).sum()
    np.testing.assert_allclose(scaled, expected, atol=1e-12)
