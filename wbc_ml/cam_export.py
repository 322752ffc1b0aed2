"""Grad-CAM as an output of the exported model, so ONNX Runtime serves it and the web process needs no TensorFlow.

Grad-CAM (Selvaraju et al. 2017) weighs the channels of the feature map ``A`` that the global average pooling reads
by ``alpha_kc = mean_ij d y_c / d A_ijk`` (``y_c`` the pre-softmax score of class ``c``). Through a global average
pooling ``d y_c / d A_ijk = (1 / HW) d y_c / d pooled_k``, so the weights only need the Jacobian of the *head*
(pooled vector -> class scores), never a backward pass through the convolutions:

- a linear head (dropout, then the softmax Dense) has the constant Jacobian ``W``: Grad-CAM is exactly CAM
  (Zhou et al. 2016);
- a non-linear head (Dense-ReLU-Dropout-Dense, BatchNormalization…) is piecewise linear: its Jacobian is the
  product of its kernels with the ReLU masks of this image, written below as a few matrix products.

Both are built from the head's own layers and weights at export time, as extra Keras operations of the serving model,
and tf2onnx converts them like any other layer. The map output holds every class's ``sum_k alpha_kc A_k`` (before the
ReLU), so one ONNX run gives the probabilities, the detector features and the map of whichever class is predicted.

A head made of anything else (a Flatten instead of a pooling, a softmax in the middle, an unknown layer) gives
``None``: such a model's Grad-CAM is made by TensorFlow in a sandboxed child instead.
"""

from __future__ import annotations

import numpy as np

from .inference import _import_keras

GRADCAM_OUTPUT = "gradcam"


def _activation_name(layer) -> str | None:
    """'linear', 'relu' or 'softmax' for a layer's Keras activation function; None for any other."""
    keras = _import_keras()
    known = {"linear": keras.activations.linear, "relu": keras.activations.relu, "softmax": keras.activations.softmax}
    activation = getattr(layer, "activation", keras.activations.linear)
    return next((name for name, function in known.items() if activation is function), None)


def _single_input_layer(tensor):
    history = getattr(tensor, "_keras_history", None)
    return history.operation if history is not None else None


def pooling_head(model) -> tuple[object, list] | None:
    """(the GlobalAveragePooling2D layer, the head layers after it in forward order) or None.

    The head is followed back from the model's output, one single-input layer at a time, and must end with a Dense
    whose activation is softmax or linear (its pre-activation is the class score).
    """
    keras = _import_keras()
    if len(model.outputs) != 1:
        return None
    layer = _single_input_layer(model.outputs[0])
    if not isinstance(layer, keras.layers.Dense) or _activation_name(layer) not in ("softmax", "linear"):
        return None
    head = [layer]
    for _ in range(64):  # a head is a handful of layers; stop rather than walk a whole network
        tensor = layer.input
        if isinstance(tensor, list | tuple):
            return None
        layer = _single_input_layer(tensor)
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            return (layer, head[::-1]) if len(layer.input.shape) == 4 and not layer.keepdims else None
        if layer is None or _backward(layer, None) is NotImplemented:
            return None
        head.append(layer)
    return None


def _backward(layer, upstream):
    """d(output)/d(input) applied to ``upstream`` (d score / d output, shape (B, D, C) or (D, C)) for one head layer;
    NotImplemented when the layer is not one we can differentiate exactly (probed with ``upstream`` None)."""
    keras = _import_keras()
    ops = keras.ops
    if isinstance(layer, keras.layers.Dropout | keras.layers.GaussianNoise | keras.layers.GaussianDropout):
        return upstream  # identity at inference
    if isinstance(layer, keras.layers.Activation | keras.layers.Dense | keras.layers.ReLU):
        relu = isinstance(layer, keras.layers.ReLU)
        if relu and (layer.max_value is not None or layer.negative_slope or layer.threshold):
            return NotImplemented
        activation = "relu" if relu else _activation_name(layer)
        if activation not in ("linear", "relu"):
            return NotImplemented
        if upstream is None:
            return None
        if activation == "relu":  # relu(z) > 0 exactly where z > 0: the output tells the mask
            mask = ops.cast(ops.greater(layer.output, 0.0), "float32")
            upstream = ops.expand_dims(mask, -1) * upstream
        if isinstance(layer, keras.layers.Dense):
            kernel = np.asarray(layer.get_weights()[0], np.float32)
            upstream = ops.matmul(kernel, upstream)
        return upstream
    if isinstance(layer, keras.layers.BatchNormalization):
        if layer.axis not in (-1, [-1], 1, [1]) or len(layer.input.shape) != 2:
            return NotImplemented
        if upstream is None:
            return None
        gamma = np.asarray(layer.gamma.numpy(), np.float64) if layer.scale else 1.0
        scale = gamma / np.sqrt(np.asarray(layer.moving_variance.numpy(), np.float64) + layer.epsilon)
        return upstream * scale.astype(np.float32)[:, None]  # KerasTensor first: numpy must not take the product
    return NotImplemented


def gradcam_output(model):
    """The Keras tensor (B, H, W, C): for each class c, ``sum_k alpha_kc A_k`` on the pooled feature map, or None.

    Apply a ReLU and scale to [0, 1] to get the class's Grad-CAM (:func:`wbc_ml.saliency.gradcam_from_raw`).
    """
    found = pooling_head(model)
    if found is None:
        return None
    keras = _import_keras()
    ops = keras.ops
    pool, head = found
    feature_map = pool.input
    _, height, width, channels = feature_map.shape
    if None in (height, width, channels):
        return None
    # d score_c / d pooled_k, from the last layer back: (K, C) while the head is linear, (B, K, C) after a ReLU
    jacobian = np.asarray(head[-1].get_weights()[0], np.float32)
    for layer in reversed(head[:-1]):
        jacobian = _backward(layer, jacobian)
    jacobian = jacobian / float(height * width)  # global average pooling: d pooled / d A_ij = 1 / HW
    if isinstance(jacobian, np.ndarray):
        raw = ops.matmul(feature_map, jacobian)
    else:
        flat = ops.reshape(feature_map, (-1, height * width, channels))
        raw = ops.reshape(ops.matmul(flat, jacobian), (-1, height, width, jacobian.shape[-1]))
    return keras.layers.Identity(name=GRADCAM_OUTPUT)(raw)
