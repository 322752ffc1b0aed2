import io

import numpy as np
from PIL import Image

from tests.conftest import TINY_SIZE, image_bytes
from wbc_ml import saliency
from wbc_ml.inference import get_classifier
from wbc_ml.preprocessing import decode_image, resize


def _pixels():
    return resize(decode_image(image_bytes(size=(64, 64))), TINY_SIZE)


def test_last_conv_layer_is_found(tiny_record):
    assert saliency.last_conv_layer(get_classifier(tiny_record.spec()).model) == "conv_last"


def test_gradcam_is_finite_in_unit_range_and_not_constant(tiny_record):
    heatmap = saliency.gradcam(get_classifier(tiny_record.spec()), _pixels(), class_index=0)
    assert heatmap.shape == (16, 16)  # the last conv layer's resolution
    assert np.isfinite(heatmap).all()
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    assert heatmap.std() > 0.01


def test_input_gradient_has_input_shape_and_structure(tiny_record):
    heatmap = saliency.input_gradient(get_classifier(tiny_record.spec()), _pixels(), class_index=2)
    assert heatmap.shape == TINY_SIZE
    assert np.isfinite(heatmap).all() and heatmap.std() > 0.01


def test_overlay_is_a_png_at_the_original_size():
    image = decode_image(image_bytes(size=(80, 60)))
    png = saliency.overlay_png(image, np.linspace(0, 1, 64).reshape(8, 8))
    decoded = Image.open(io.BytesIO(png))
    assert decoded.format == "PNG" and decoded.size == (80, 60)
    # the colour map changes pixels: the overlay is not the original image
    assert np.abs(np.asarray(decoded, np.int16) - np.asarray(image, np.int16)).mean() > 5


def test_gradcam_reads_the_pooled_feature_map_and_the_pre_softmax_score(tmp_path):
    """With global average pooling and a softmax Dense head, Grad-CAM of the class score is exactly CAM
    (Zhou et al. 2016): relu(sum_k A_k w_kc) on the feature map the pooling reads, even for a confident model."""
    import keras

    from tests.conftest import build_tiny_model
    from wbc_ml.checksums import file_sha256
    from wbc_ml.inference import ModelSpec

    path = tmp_path / "confident.keras"
    build_tiny_model(path, favour=1)  # p(class 1) ~ 0.97: the gradient of p would nearly vanish
    spec = ModelSpec(path, file_sha256(path), TINY_SIZE, {"method": "scale01"}, ("a", "b", "c", "d", "e"))
    classifier = get_classifier(spec)
    model = classifier.model
    assert saliency.gradcam_feature_map(model) is model.get_layer("gap").input
    pixels = _pixels()
    feature_map = keras.Model(model.inputs, model.get_layer("gap").input)(classifier.prepare(pixels[None]))[0]
    weights = model.get_layer("probabilities").get_weights()[0]
    for class_index in (1, 3):
        cam = np.maximum(np.asarray(feature_map, np.float64) @ weights[:, class_index], 0.0)
        expected = (cam - cam.min()) / (cam.max() - cam.min())
        heatmap = saliency.gradcam(classifier, pixels, class_index)
        np.testing.assert_allclose(heatmap, expected, atol=1e-4)
