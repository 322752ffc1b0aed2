"""Saliency maps: Grad-CAM on the last convolutional layer, and plain input gradients.

TensorFlow is used here for gradients only; callers pass a loaded :class:`Classifier`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .inference import Classifier

METHODS = ("gradcam", "gradient")
COLORMAP = "turbo"


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
    """The feature map Grad-CAM looks at: the one the global pooling ('gap') reads, i.e. after the last
    BatchNormalization and ReLU (the last Conv2D's raw output, before them, is not what the classifier sees);
    the last Conv2D's output when the model has no 'gap' layer."""
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


def gradcam(classifier: Classifier, pixels: np.ndarray, class_index: int, layer_name: str | None = None) -> np.ndarray:
    """Grad-CAM heatmap in [0, 1] at the feature map's resolution (Selvaraju et al. 2017), of the pre-softmax score."""
    tf = _tf()
    import keras

    model = classifier.model
    feature_map = model.get_layer(layer_name).output if layer_name else gradcam_feature_map(model)
    scores, are_logits = _class_scores(model, model.outputs[0])
    grad_model = keras.Model(model.inputs, [feature_map, scores])
    x = tf.convert_to_tensor(classifier.prepare(pixels[None]))
    with tf.GradientTape() as tape:
        activations, out = grad_model(x, training=False)
        score = out[:, class_index] if are_logits else tf.math.log(out[:, class_index] + 1e-12)
    grads = tape.gradient(score, activations)[0].numpy()
    activations = activations[0].numpy()
    weights = grads.mean(axis=(0, 1))
    cam = np.maximum((activations * weights).sum(axis=-1), 0.0)
    return _unit(cam)


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


def overlay_png(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
    """Blend a [0, 1] heatmap, coloured with a perceptual colour map, over the original image."""
    from matplotlib import colormaps

    base = image.convert("RGB")
    heat = Image.fromarray((heatmap * 255).astype(np.uint8)).resize(base.size, Image.Resampling.BILINEAR)
    coloured = colormaps[COLORMAP](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]
    blended = (1 - alpha) * np.asarray(base, dtype=np.float32) / 255.0 + alpha * coloured
    out = Image.fromarray((np.clip(blended, 0, 1) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
