import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import BUNDLED_MODELS, TINY_SIZE, build_tiny_model, image_bytes, require_shared_data
from wbc_ml import cam_export, saliency
from wbc_ml.checksums import file_sha256
from wbc_ml.inference import ModelSpec, OnnxBackend, get_classifier, load_keras_model
from wbc_ml.onnx_export import export_model_onnx
from wbc_ml.preprocessing import Normalization, decode_image, resize


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


def test_overlay_is_a_webp_at_the_original_size():
    image = decode_image(image_bytes(size=(80, 60)))
    picture = saliency.overlay(image, np.linspace(0, 1, 64).reshape(8, 8))
    decoded = Image.open(io.BytesIO(picture))
    assert decoded.format == "WEBP" and decoded.size == (80, 60)
    assert saliency.content_type("saliency/1/x-gradcam.webp") == "image/webp"
    assert saliency.content_type("saliency/1/x-gradcam.png") == "image/png"  # maps stored before WebP
    # the colour map changes pixels: the overlay is not the original image
    assert np.abs(np.asarray(decoded, np.int16) - np.asarray(image, np.int16)).mean() > 5


def test_overlay_blends_the_colour_map_of_the_heatmap_over_the_image():
    """Each pixel is 0.55 image + 0.45 the colour map's colour at the (bilinearly enlarged) heatmap's value."""
    image = decode_image(image_bytes(size=(96, 80)))
    heatmap = np.linspace(0, 1, 48).reshape(6, 8)
    decoded = np.asarray(Image.open(io.BytesIO(saliency.overlay(image, heatmap))).convert("RGB"), np.float64)
    values = Image.fromarray((heatmap * 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
    expected = 0.55 * np.asarray(image, np.float64) + 0.45 * saliency._colour_table()[np.asarray(values)]
    assert np.abs(decoded - expected).mean() < 4  # WebP is lossy; a wrong colour (e.g. grey) is off by far more
    wrong = 0.55 * np.asarray(image, np.float64) + 0.45 * np.asarray(values, np.float64)[..., None]
    assert np.abs(decoded - wrong).mean() > 20


def test_gradcam_reads_the_pooled_feature_map_and_the_pre_softmax_score(tmp_path):
    """With global average pooling and a softmax Dense head, Grad-CAM of the class score is exactly CAM
    (Zhou et al. 2016): relu(sum_k A_k w_kc) on the feature map the pooling reads, even for a confident model."""
    import keras

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


# --- Grad-CAM from the ONNX copy (no TensorFlow where it is served) --------------------------------------------------


def _nonlinear_head_model(path: Path, flatten: bool = False):
    """A small CNN whose head after the pooling is not linear: Dense-ReLU, BatchNormalization, Dropout, Dense-ReLU
    (an Activation layer), then the softmax Dense; BatchNormalization+ReLU before the pooling, as in our CNN.
    ``flatten``: a Flatten instead of the global pooling (no CAM identity exists)."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input(shape=(*TINY_SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(16, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x) if flatten else keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(24, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.4)(x)
    x = keras.layers.Dense(12)(x)
    x = keras.layers.Activation("relu")(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # trained-looking statistics, so the BatchNormalization scale is not 1
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, layer.moving_variance.shape))
            layer.moving_mean.assign(rng.normal(0, 0.2, layer.moving_mean.shape))
            layer.gamma.assign(rng.normal(1.0, 0.5, layer.gamma.shape))
    model.save(path)
    return model


def _tiny_cells(n: int = 6) -> np.ndarray:
    return np.stack([resize(decode_image(image_bytes(color=(40 * i, 120, 220 - 30 * i))), TINY_SIZE) for i in range(n)])


def _onnx_maps_against_tensorflow(model, tmp_path, normalization: dict, cells: np.ndarray) -> float:
    """Export ``model`` and return the largest |ONNX Grad-CAM - TensorFlow Grad-CAM| over the cells and classes."""
    size = cells.shape[1:3]
    export_model_onnx(model, tmp_path / "model.onnx", size, normalization)
    backend = OnnxBackend(tmp_path / "model.onnx")
    assert backend.roles == ("features", "probabilities", "gradcam")
    batch = Normalization.from_dict(normalization).apply(cells)
    maps = backend.run_all(batch).gradcam_raw
    every_class = saliency.keras_gradcam_raw_classes(model, batch, list(range(maps.shape[-1])))
    worst = 0.0
    for class_index in range(maps.shape[-1]):
        for served, reference in zip(maps[..., class_index], every_class[..., class_index], strict=True):
            difference = saliency.gradcam_from_raw(served) - saliency.gradcam_from_raw(reference)
            worst = max(worst, float(np.abs(difference).max()))
    return worst


def test_onnx_gradcam_equals_tensorflow_gradcam_for_a_linear_head(tmp_path, tiny_model_file):
    """GAP then the softmax Dense: the exact CAM identity, weights = the Dense kernel's column."""
    model = load_keras_model(tiny_model_file)
    pool, head = cam_export.pooling_head(model)
    assert pool.name == "gap" and [layer.name for layer in head] == ["probabilities"]
    assert _onnx_maps_against_tensorflow(model, tmp_path, {"method": "scale01"}, _tiny_cells()) <= 1e-4


def test_onnx_gradcam_equals_tensorflow_gradcam_for_a_non_linear_head(tmp_path):
    """Dense-ReLU-BN-Dropout-Dense-ReLU-Dense: the head's Jacobian with this image's ReLU masks, in the graph."""
    model = _nonlinear_head_model(tmp_path / "head.keras")
    assert len(cam_export.pooling_head(model)[1]) == 6
    assert _onnx_maps_against_tensorflow(model, tmp_path, {"method": "scale01"}, _tiny_cells()) <= 1e-4


def test_a_head_without_global_pooling_is_exported_without_maps(tmp_path):
    model = _nonlinear_head_model(tmp_path / "flat.keras", flatten=True)
    assert cam_export.pooling_head(model) is None
    export_model_onnx(model, tmp_path / "flat.onnx", TINY_SIZE, {"method": "scale01"})
    backend = OnnxBackend(tmp_path / "flat.onnx")
    assert backend.roles == ("probabilities",) and not backend.with_gradcam


def test_classifying_with_the_onnx_copy_returns_the_predicted_class_map(tmp_path, tiny_model_file):
    """One ONNX run gives the probabilities, the features and the predicted class's map, and that map is the one
    TensorFlow's Grad-CAM gives for the class."""
    import shutil

    path = tmp_path / "tiny.keras"
    shutil.copy(tiny_model_file, path)
    export_model_onnx(load_keras_model(path), tmp_path / "tiny.onnx", TINY_SIZE, {"method": "scale01"})
    common = dict(path=path, sha256=file_sha256(path), input_size=TINY_SIZE, normalization={"method": "scale01"})
    classes = ("a", "b", "c", "d", "e")
    onnx_copy = {"onnx_path": tmp_path / "tiny.onnx", "onnx_sha256": file_sha256(tmp_path / "tiny.onnx")}
    onnx = get_classifier(ModelSpec(**common, class_names=classes, **onnx_copy))
    assert onnx.has_gradcam and not onnx.serves_with_tensorflow
    tensorflow = get_classifier(ModelSpec(**common, class_names=classes))
    cells = _tiny_cells(3)
    for cell, result in zip(cells, onnx.predict(cells), strict=True):
        expected = saliency.gradcam(tensorflow, cell, result.class_index)
        np.testing.assert_allclose(saliency.gradcam_from_raw(result.gradcam_raw), expected, atol=1e-4)
        np.testing.assert_allclose(
            saliency.gradcam_from_raw(onnx.gradcam_raw(cell, result.class_index)), expected, atol=1e-4
        )


def _card(arch: str) -> dict:
    return json.loads((BUNDLED_MODELS / f"{arch}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["enhanced_cnn_v2", "mobilenet_v2_finetuned"])
def test_onnx_gradcam_of_the_bundled_models_equals_tensorflow_on_real_cells(arch, tmp_path):
    """The CNN's head is Dense-ReLU-Dropout-Dense, MobileNetV2's Dropout-Dense: both maps match TensorFlow's."""
    from wbc_ml import datasets

    pbc = require_shared_data()
    card = _card(arch)
    model = load_keras_model(BUNDLED_MODELS / card["file"])
    cells, _ = datasets.load_arrays(datasets.list_images(pbc)[::3000], tuple(card["input_size"]))
    assert _onnx_maps_against_tensorflow(model, tmp_path, card["normalization"], cells) <= 1e-3


@pytest.mark.slow
def test_served_gradcam_falls_on_the_stained_nucleus_of_real_cells(tmp_path):
    """On real PBC cells the served map (the ONNX copy's, as the web process makes it) concentrates on the cell: the
    dark-stained nucleus (a fair proxy for the cell) holds at least 1.5 times its share of the image area of the
    map's mass on every cell, and 2.5 times on the median cell (measured: 2.6 to 4.3)."""
    from scipy import ndimage

    from wbc_ml import datasets

    pbc = require_shared_data()
    card = _card("enhanced_cnn_v2")
    size = tuple(card["input_size"])
    export_model_onnx(
        load_keras_model(BUNDLED_MODELS / card["file"]), tmp_path / "cnn.onnx", size, card["normalization"]
    )
    backend = OnnxBackend(tmp_path / "cnn.onnx")
    concentration = []
    for sample in datasets.list_images(pbc)[::900]:  # ten cells over the five classes
        image = decode_image(sample.path.read_bytes())
        out = backend.run_all(Normalization.from_dict(card["normalization"]).apply(resize(image, size)[None]))
        heat = saliency.gradcam_from_raw(out.gradcam_raw[0, :, :, int(out.probabilities[0].argmax())])
        heat = Image.fromarray((heat * 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
        mass = np.asarray(heat, np.float64)
        green = np.asarray(image.convert("RGB"), np.float64)[..., 1]
        nucleus = ndimage.binary_opening(green < 0.6 * np.median(green), iterations=2)  # purple: little green
        assert 0.02 < nucleus.mean() < 0.3, sample.path  # the proxy found a nucleus
        concentration.append((mass[nucleus].sum() / mass.sum()) / nucleus.mean())
    assert min(concentration) >= 1.5 and float(np.median(concentration)) >= 2.5, concentration
