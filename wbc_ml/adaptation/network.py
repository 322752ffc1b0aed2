"""Cutting a served classifier into a frozen trunk and a trainable tail, re-estimating BatchNormalization, and
putting a new head on it (TensorFlow/Keras).

The tail is the last convolution block up to the 'gap' pooling layer (for MobileNetV2: ``block_16`` and
``Conv_1``, as in training). It must be a plain chain of single-input layers, which holds for the bundled
architectures and for any "convolutions, then global average pooling" network.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from ..inference import detector_features, load_keras_model
from ..preprocessing import Normalization

MOBILENET_SPLIT_LAYER = "block_15_add"
CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)


class UnsupportedModel(ValueError):
    """The base model cannot be adapted (no 'gap' layer, or no plain chain of layers before it)."""


def _producer(layer) -> keras.layers.Layer:
    tensor = layer.input
    if isinstance(tensor, list | tuple):
        raise UnsupportedModel(f"layer {layer.name} has several inputs; the tail before 'gap' must be a plain chain")
    return tensor._keras_history.operation


@dataclass
class Parts:
    """One loaded copy of the base model, cut at ``split``: ``trunk`` (image -> activations, frozen) and ``tail``
    (the chain of layers from the split to 'gap', shared with ``full``)."""

    full: keras.Model
    split: str
    trunk: keras.Model
    tail_layers: list  # in order, ending with 'gap'

    @property
    def gap(self):
        return self.full.get_layer("gap")

    def top_features(self) -> keras.Model:
        """activations -> detector features (average- and max-pooled), through the (shared) tail layers."""
        inputs = keras.Input(shape=self.trunk.output.shape[1:], name="trunk_activations")
        x = inputs
        for layer in self.tail_layers[:-1]:
            x = layer(x)
        return keras.Model(inputs, detector_features(self.gap(x), x))

    def head_input(self, feature_map, pooling: str):
        """What a new head sees: the 'gap' features ('avg'), or those and a max pooling of the map ('avg+max')."""
        pooled = self.gap(feature_map)
        if pooling == "avg":
            return pooled
        peaks = keras.layers.GlobalMaxPooling2D(name="head_max_pool")(feature_map)
        return keras.layers.Concatenate(name="head_features")([pooled, peaks])

    def with_head(self, head: keras.layers.Layer, pooling: str) -> keras.Model:
        """The full served network: image -> ... -> 'gap' (and max pooling) -> ``head`` (softmax probabilities)."""
        return keras.Model(self.full.input, head(self.head_input(self.gap.input, pooling)), name="adapted")


def cut(model: keras.Model) -> Parts:
    """Cut ``model`` before its last convolution block (MobileNetV2: after ``block_15_add``)."""
    names = {layer.name for layer in model.layers}
    if "gap" not in names:
        raise UnsupportedModel("the model has no 'gap' (global average pooling) layer to put a new head on")
    chain = [model.get_layer("gap")]
    while True:
        producer = _producer(chain[-1])
        if isinstance(producer, keras.layers.InputLayer):
            raise UnsupportedModel("no convolution before 'gap' to fine-tune")
        if producer.name == MOBILENET_SPLIT_LAYER or (
            any(isinstance(layer, CONVOLUTIONS) for layer in chain) and MOBILENET_SPLIT_LAYER not in names
        ):
            split = producer
            break
        chain.append(producer)
    chain.reverse()
    trunk = keras.Model(model.input, split.output, name="trunk")
    return Parts(model, split.name, trunk, chain)


def batchnorm_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def reestimate_batchnorm(model: keras.Model, x: np.ndarray, normalization: Normalization, batch_size: int = 32) -> int:
    """Set every BatchNormalization layer's moving mean/variance to its average over the lab's images (label-free).

    The layers are switched to training behaviour one pass at a time with a cumulative-mean momentum ("precise
    BN"), so the statistics are exactly the average of the per-batch statistics. Returns the number of layers.
    """
    layers = batchnorm_layers(model)
    if not layers or not len(x):
        return 0
    saved = [(layer.momentum, layer.trainable) for layer in layers]
    order = np.random.default_rng(0).permutation(len(x))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size // 2:  # a tiny last batch gives noisy statistics
        last = batches.pop()
        batches[-1] = np.concatenate([batches[-1], last])
    for k, batch in enumerate(batches):
        for layer in layers:
            layer.trainable = True  # frozen BatchNormalization ignores training=True in Keras 3
            layer.momentum = k / (k + 1)
        model(normalization.apply(x[batch]), training=True)
    for layer, (momentum, trainable) in zip(layers, saved, strict=True):
        layer.momentum, layer.trainable = momentum, trainable
    return len(layers)


def load_parts(base_path, x_for_batchnorm: np.ndarray | None, normalization: Normalization) -> Parts:
    """A fresh copy of the base model (BatchNormalization re-estimated on ``x_for_batchnorm`` when given), cut."""
    model = load_keras_model(base_path)
    if x_for_batchnorm is not None:
        reestimate_batchnorm(model, x_for_batchnorm, normalization)
    for layer in model.layers:
        layer.trainable = False
    return cut(model)


def dense_head(weights: np.ndarray, bias: np.ndarray) -> keras.layers.Dense:
    """A softmax Dense layer named 'probabilities' with the given (features, classes) weights."""
    head = keras.layers.Dense(weights.shape[1], activation="softmax", name="probabilities")
    head.build((None, weights.shape[0]))
    head.set_weights([weights.astype(np.float32), bias.astype(np.float32)])
    return head


def predict(model: keras.Model, x: np.ndarray, normalization: Normalization | None, batch_size: int = 32):
    """Batched ``predict_on_batch`` (outputs concatenated; a list when the model has several outputs)."""
    outputs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        out = model.predict_on_batch(normalization.apply(chunk) if normalization is not None else chunk)
        outputs.append([np.asarray(o) for o in out] if isinstance(out, list | tuple) else [np.asarray(out)])
    merged = [np.concatenate(parts) for parts in zip(*outputs, strict=True)]
    return merged if len(merged) > 1 else merged[0]
