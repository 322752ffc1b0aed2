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
