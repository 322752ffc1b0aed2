"""Saliency maps: Grad-CAM on the feature map the global pooling reads, plain input gradients, and their overlays.

The web process uses only :func:`gradcam_from_raw` and :func:`overlay` here: its Grad-CAM comes from the ONNX copy
(:mod:`wbc_ml.cam_export`). The TensorFlow functions (imported lazily) serve the sandboxed child
(:mod:`wbc_ml.saliency_child`), the export's check and the tests.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

from .inference import Classifier

METHODS = ("gradcam", "gradient")
COLORMAP = "turbo"
OVERLAY_FORMAT = "WEBP"
OVERLAY_SUFFIX = ".webp"
OVERLAY_CONTENT_TYPE = "image/webp"
OVERLAY_WEBP_METHOD = 0  # 0 (fastest) .. 6 (smallest): 0 encodes a 360 px cell ~2x faster than 4, 5% larger


def _tf():
    import tensorflow as tf

    return tf


def last_conv_layer(model) -> str:
    """Name of the last Conv2D layer (Grad-CAM's usual target)."""
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Conv2D):
            return layer.name
    raise ValueError("the model has no Conv2D layer for Grad-CAM")


def gradcam_feature_map(model):
    """The feature map Grad-CAM looks at: the one the global average pooling before the class scores reads, i.e.
    after the last BatchNormalization and ReLU (the last Conv2D's raw output, before them, is not what the
    classifier sees); the last Conv2D's output when the model has no such pooling. The ONNX export uses the same
    pooling (:func:`wbc_ml.cam_export.pooling_head`)."""
    from .cam_export import pooling_head

    found = pooling_head(model)
    if found is not None:
        return found[0].input
    if any(layer.name == "gap" for layer in model.layers):
        return model.get_layer("gap").input
    return model.get_layer(last_conv_layer(model)).output


def _class_scores(model, outputs):
    """The pre-softmax class scores (logits) when the model ends with a softmax Dense layer, else log p.

    Grad-CAM is defined on the score before the softmax (Selvaraju et al. 2017); the gradient of p, or of log p,
    also carries the other classes' scores and vanishes for a very confident prediction.
    """
    import keras

    last = outputs._keras_history.operation if hasattr(outputs, "_keras_history") else None
    if not (isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax):
        return outputs, False
    logits = keras.layers.Dense(last.units, name="gradcam_logits")  # the same weights, no softmax
    scores = logits(last.input)
    logits.set_weights(last.get_weights())
    return scores, True


def keras_gradcam_raw(model, batch: np.ndarray, class_index: int, layer_name: str | None = None) -> np.ndarray:
    """``sum_k alpha_k A_k`` (before the ReLU), shape (B, H, W), by TensorFlow's gradient of the class score.

    ``batch`` is normalised model input. The reference the ONNX map (:mod:`wbc_ml.cam_export`) is checked against,
    and the sandboxed child's method for a model whose head that export cannot differentiate.
    """
    return keras_gradcam_raw_classes(model, batch, [class_index], layer_name)[..., 0]


def keras_gradcam_raw_classes(
    model, batch: np.ndarray, class_indices: list[int], layer_name: str | None = None
) -> np.ndarray:
    """:func:`keras_gradcam_raw` for several classes, shape (B, H, W, len(class_indices)): one forward pass."""
    tf = _tf()
    import keras

    feature_map = model.get_layer(layer_name).output if layer_name else gradcam_feature_map(model)
    scores, are_logits = _class_scores(model, model.outputs[0])
    grad_model = keras.Model(model.inputs, [feature_map, scores])
    x = tf.convert_to_tensor(batch)
    with tf.GradientTape(persistent=True) as tape:
        activations, out = grad_model(x, training=False)
        chosen = [out[:, c] if are_logits else tf.math.log(out[:, c] + 1e-12) for c in class_indices]
    maps = []
    for score in chosen:
        weights = tape.gradient(score, activations).numpy().mean(axis=(1, 2), keepdims=True)
        maps.append((activations.numpy() * weights).sum(axis=-1))
    del tape
    return np.stack(maps, axis=-1)


def gradcam_from_raw(raw: np.ndarray) -> np.ndarray:
    """Grad-CAM in [0, 1] from one image's ``sum_k alpha_k A_k``: the ReLU, then scaled to its maximum."""
    return _unit(np.maximum(raw, 0.0))


def gradcam(classifier: Classifier, pixels: np.ndarray, class_index: int, layer_name: str | None = None) -> np.ndarray:
    """Grad-CAM heatmap in [0, 1] at the feature map's resolution (Selvaraju et al. 2017), of the pre-softmax score,
    computed with TensorFlow (the web process uses the ONNX copy's map instead: :meth:`Classifier.gradcam`)."""
    raw = keras_gradcam_raw(classifier.model, classifier.prepare(pixels[None]), class_index, layer_name)
    return gradcam_from_raw(raw[0])


def input_gradient(classifier: Classifier, pixels: np.ndarray, class_index: int) -> np.ndarray:
    """|d log p(class) / d input|, max over colour channels, in [0, 1] at input resolution."""
    tf = _tf()
    x = tf.convert_to_tensor(classifier.prepare(pixels[None]))
    with tf.GradientTape() as tape:
        tape.watch(x)
        probs = classifier.model(x, training=False)
        score = tf.math.log(probs[:, class_index] + 1e-12)
    grads = np.abs(tape.gradient(score, x)[0].numpy()).max(axis=-1)
    return _unit(np.minimum(grads, np.quantile(grads, 0.99)))


def _unit(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def saliency_map(classifier: Classifier, pixels: np.ndarray, class_index: int, method: str) -> np.ndarray:
    if method == "gradcam":
        return gradcam(classifier, pixels, class_index)
    if method == "gradient":
        return input_gradient(classifier, pixels, class_index)
    raise ValueError(f"unknown saliency method {method!r}; choose one of {METHODS}")


@functools.cache
def _colour_table() -> np.ndarray:
    """The colour map as a 256 x 3 uint8 table, computed once per process."""
    from matplotlib import colormaps

    return np.round(colormaps[COLORMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


@functools.cache
def _palette() -> bytes:
    """:func:`_colour_table` as a Pillow palette (768 bytes)."""
    return _colour_table().tobytes()


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
    """Blend a [0, 1] heatmap, coloured with a perceptual colour map, over the original image; WebP bytes.

    WebP is a fraction of PNG's size and a few milliseconds to encode (PNG with ``optimize`` took longer than the
    model itself); the overlay is a picture for the eye, not data. Colouring is Pillow's palette look-up (in C; a
    numpy fancy-index of the same table took ~20x longer) and the blend is Pillow's, so the whole overlay costs a few
    milliseconds for a 360 px cell.
    """
    base = image.convert("RGB")
    heat = Image.fromarray((np.clip(heatmap, 0.0, 1.0) * 255).astype(np.uint8)).resize(
        base.size, Image.Resampling.BILINEAR
    )
    heat.putpalette(_palette())  # the 0-255 values become indices into the colour map
    coloured = heat.convert("RGB")
    buffer = io.BytesIO()
    Image.blend(base, coloured, alpha).save(buffer, format=OVERLAY_FORMAT, quality=90, method=OVERLAY_WEBP_METHOD)
    return buffer.getvalue()


def content_type(file_name: str) -> str:
    """The Content-Type of a stored overlay: WebP now, PNG for the maps stored before."""
    return "image/png" if file_name.lower().endswith(".png") else OVERLAY_CONTENT_TYPE
