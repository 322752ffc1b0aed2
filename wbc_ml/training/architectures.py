"""The networks: Enhanced CNNv2 (from scratch) and MobileNetV2 with our head."""

from __future__ import annotations

from dataclasses import dataclass

import keras

from ..inference import detector_features

MOBILENET_SPLIT_LAYER = "block_15_add"
MOBILENET_TRAINABLE_PREFIXES = ("block_16_", "Conv_1")


def build_enhanced_cnn_v2(input_size: tuple[int, int], n_classes: int = 5) -> keras.Model:
    """Four Conv-BN-ReLU blocks (L2 1e-4) with max pooling, GAP, Dense 128, dropout, softmax."""
    reg = keras.regularizers.L2(1e-4)
    inputs = keras.Input(shape=(*input_size, 3), name="image")
    x = inputs
    for block, filters in enumerate((32, 64, 128, 256), start=1):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, kernel_regularizer=reg, name=f"block{block}_conv"
        )(x)
        # momentum 0.9: with Adam and L2 the activation statistics move fast; the Keras default (0.99) left the
        # moving averages so far behind that inference-mode accuracy stayed near chance for several epochs.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(128, activation="relu", kernel_regularizer=reg, name="fc128")(x)
    x = keras.layers.Dropout(0.4, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="enhanced_cnn_v2")


def _mobilenet_backbone(input_size: tuple[int, int], weights: str | None) -> keras.Model:
    if weights == "none":  # random initialisation: only for smoke tests of the training code itself
        weights = None
    elif weights != "imagenet" and not str(weights).endswith(".h5"):
        raise ValueError("--imagenet-weights must be 'imagenet', a path to the no-top .h5 file, or 'none'")
    return keras.applications.MobileNetV2(input_shape=(*input_size, 3), include_top=False, alpha=1.0, weights=weights)


@dataclass
class MobileNetParts:
    full: keras.Model  # image -> probabilities (what is saved and served)
    trunk: keras.Model  # image -> block_15_add activations (frozen, used to build the cache)
    top: keras.Model  # block_15_add activations -> probabilities (shares layers with ``full``)
    top_features: keras.Model  # block_15_add activations -> detector features (average- and max-pooled)


def build_mobilenet_v2(input_size: tuple[int, int], weights: str | None, n_classes: int = 5):
    """MobileNetV2 + head, flat (no nested model) so Grad-CAM can reach ``Conv_1`` directly."""
    backbone = _mobilenet_backbone(input_size, weights)
    backbone.trainable = False
    dropout = keras.layers.Dropout(0.3, name="head_dropout")
    dense = keras.layers.Dense(n_classes, activation="softmax", name="probabilities")
    gap = keras.layers.GlobalAveragePooling2D(name="gap")
    pooled = gap(backbone.output)
    full = keras.Model(backbone.input, dense(dropout(pooled)), name="mobilenet_v2_wbc")

    split = backbone.get_layer(MOBILENET_SPLIT_LAYER)
    trunk = keras.Model(backbone.input, split.output, name="mobilenet_v2_trunk")
    names = [layer.name for layer in backbone.layers]
    after = backbone.layers[names.index(MOBILENET_SPLIT_LAYER) + 1 :]
    top_input = keras.Input(shape=split.output.shape[1:], name="block_15_activations")
    x = top_input
    for layer in after:  # block_16 has no residual connection, so the tail is a plain chain
        x = layer(x)
    features = gap(x)
    top = keras.Model(top_input, dense(dropout(features)), name="mobilenet_v2_top")
    top_features = keras.Model(top_input, detector_features(features, x), name="mobilenet_v2_top_features")
    return MobileNetParts(full, trunk, top, top_features)


def unfreeze_last_block(parts: MobileNetParts) -> list[str]:
    """Make block_16 and Conv_1 trainable, BatchNormalization layers excepted."""
    unfrozen = []
    for layer in parts.full.layers:
        if layer.name.startswith(MOBILENET_TRAINABLE_PREFIXES):
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = not is_bn
            if not is_bn:
                unfrozen.append(layer.name)
    return unfrozen
