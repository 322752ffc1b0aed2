"""Method (b): fine-tune the last block and a new head on cached trunk activations of several views per cell.

The trunk (everything before the last block) is frozen and run once per view; its BatchNormalization
statistics were re-estimated on the lab's images beforehand, and the tail's BatchNormalization layers stay
frozen at those statistics while the convolutions and the head train (class-balanced, Adam). The head starts
from the logistic-regression head, so a few epochs at a small learning rate only refine it.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from ..training.common import class_weights
from .heads import LinearHead
from .network import Parts, dense_head, predict

BATCH_SIZE = 32
EpochHook = Callable[[], None]


class _EachEpoch(keras.callbacks.Callback):
    """Calls ``hook`` after every epoch: progress, and the chance to cancel (it may raise)."""

    def __init__(self, hook: EpochHook):
        super().__init__()
        self.hook = hook

    def on_epoch_end(self, epoch, logs=None):
        self.hook()


def snapshot(parts: Parts) -> list[list[np.ndarray]]:
    return [layer.get_weights() for layer in parts.tail_layers]


def restore(parts: Parts, saved: list[list[np.ndarray]]) -> None:
    for layer, weights in zip(parts.tail_layers, saved, strict=True):
        layer.set_weights(weights)


def finetune(
    parts: Parts,
    acts: np.ndarray,
    labels: np.ndarray,
    start: LinearHead,
    learning_rate: float,
    epochs: int,
    seed: int,
    pooling: str,
    on_epoch: EpochHook | None = None,
) -> keras.layers.Dense:
    """Train the tail (not its BatchNormalization) and a head initialised from ``start``; returns the head."""
    keras.utils.set_random_seed(seed)
    n_classes = start.n_classes
    head = dense_head(*start.weights())
    for layer in parts.tail_layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    inputs = keras.Input(shape=acts.shape[2:])
    x = inputs
    for layer in parts.tail_layers[:-1]:
        x = layer(x)
    model = keras.Model(inputs, head(parts.head_input(x, pooling)))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="categorical_crossentropy")
    n, views = acts.shape[:2]
    y = np.repeat(labels, views)
    weights = class_weights(labels, n_classes)[y].astype(np.float32)
    model.fit(
        acts.reshape(n * views, *acts.shape[2:]),
        np.eye(n_classes, dtype=np.float32)[y],
        sample_weight=weights,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        callbacks=[_EachEpoch(on_epoch)] if on_epoch else [],
    )
    for layer in parts.tail_layers:
        layer.trainable = False
    return head


def tail_probabilities(parts: Parts, head: keras.layers.Dense, acts: np.ndarray, pooling: str) -> np.ndarray:
    inputs = keras.Input(shape=acts.shape[1:])
    x = inputs
    for layer in parts.tail_layers[:-1]:
        x = layer(x)
    model = keras.Model(inputs, head(parts.head_input(x, pooling)))
    return np.asarray(predict(model, acts, None, batch_size=64), np.float64)


def cross_validate(
    parts: Parts,
    acts: np.ndarray,
    pooled: np.ndarray,
    labels: np.ndarray,
    splits: list,
    params: dict,
    seed: int,
    n_classes: int,
    on_epoch: EpochHook | None = None,
) -> np.ndarray:
    """Out-of-fold probabilities (original view): each fold fine-tunes from the same starting weights."""
    saved = snapshot(parts)
    oof = np.zeros((len(labels), n_classes))
    for fold, (train, val) in enumerate(splits):
        start = LinearHead(params["C"], n_classes).fit(pooled[train], labels[train])
        head = finetune(
            parts, acts[train], labels[train], start, params["learning_rate"], params["epochs"], seed + fold,
            params["pooling"], on_epoch,
        )  # fmt: skip
        oof[val] = tail_probabilities(parts, head, acts[val, 0], params["pooling"])
        restore(parts, saved)
    return oof
