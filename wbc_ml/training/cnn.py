"""Training Enhanced CNNv2 end to end, with outlier exposure and precise BatchNormalization."""

from __future__ import annotations

import keras
import numpy as np

from .. import datasets
from ..preprocessing import Normalization
from .architectures import build_enhanced_cnn_v2
from .augmentation import AUGMENTATIONS, AugmentedBatches
from .common import EpochLog, TrainResult, features_and_probs
from .config import Log, TrainConfig
from .detectors import non_wbc_parts

OUTLIER_REPEATS = 4  # outlier exposure: passes over the non-WBC fit third per epoch
OUTLIER_WEIGHT = 0.5  # their share of the loss relative to the WBC images (lambda in Hendrycks et al.)


def train_cnn(config, x_train, y_train, x_val, y_val, weights, log):
    size = config.input_size
    mean = x_train.reshape(-1, 3).mean(axis=0, dtype=np.float64)
    std = x_train.reshape(-1, 3).std(axis=0, dtype=np.float64)
    normalization = Normalization(
        "zscore", tuple(round(float(v), 3) for v in mean), tuple(round(float(v), 3) for v in std)
    )
    log(f"normalisation from the train split: {normalization.to_dict()}")
    model = build_enhanced_cnn_v2(size)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    n_classes = len(weights)
    x_fit, y_fit, w_fit = with_outlier_exposure(config, x_train, y_train, weights, log)
    train_data = AugmentedBatches(
        x_fit, y_fit, w_fit, config.batch_size, normalization, config.seed, config.augmentation
    )
    config.extra["augmentation"] = f"on the fly: {AUGMENTATIONS[config.augmentation]}"
    val_x = normalization.apply(x_val)
    val_y = np.eye(n_classes, dtype=np.float32)[y_val]
    clean_train = normalization.apply(x_train[np.random.default_rng(config.seed).permutation(len(x_train))[:1920]])
    callbacks = [
        _RecalibrateBeforeValidation(clean_train),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2, min_lr=1e-5),
        EpochLog(log),
    ]
    history = model.fit(
        train_data, validation_data=(val_x, val_y), epochs=config.epochs, callbacks=callbacks, verbose=0
    )
    recalibrate_batchnorm(model, clean_train)  # restore_best_weights brought back that epoch's raw statistics
    served = build_enhanced_cnn_v2(config.input_size)  # a fresh, never-compiled copy: no optimizer state saved
    served.set_weights(model.get_weights())
    train_features, _ = features_and_probs(served, x_train, normalization)
    val_features, val_probs = features_and_probs(served, x_val, normalization)
    return TrainResult(served, normalization, history.history, train_features, val_features, val_probs)


def with_outlier_exposure(
    config: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, weights: np.ndarray, log: Log
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training arrays (images, targets, sample weights), with outlier exposure when non-WBC cells are at hand.

    Outlier exposure (Hendrycks et al., ICLR 2019): the fit third of ``pbc-non-wbc/`` (never the choose or
    report third) joins training with a *uniform* target over the five classes, so the network learns to be unsure
    about platelets, erythroblasts and immature granulocytes instead of calling them a confident neutrophil.
    The outliers are repeated ``OUTLIER_REPEATS`` times (each time freshly augmented) and weighted so that
    their loss counts ``OUTLIER_WEIGHT`` times the WBC loss, the paper's lambda.
    """
    n_classes = len(weights)
    targets = np.eye(n_classes, dtype=np.float32)[y_train]
    sample_weights = weights[y_train].astype(np.float32)
    fit_half = non_wbc_parts(config.data_dir).fit
    if not fit_half:
        return x_train, targets, sample_weights
    x_out, _ = datasets.load_arrays([datasets.Sample(p, -1) for p in fit_half], config.input_size)
    x_out = np.concatenate([x_out] * OUTLIER_REPEATS)
    w_out = np.full(len(x_out), OUTLIER_WEIGHT * sample_weights.sum() / len(x_out), np.float32)
    config.extra["outlier_exposure"] = (
        f"{len(fit_half)} images (the fit third of pbc-non-wbc/) x{OUTLIER_REPEATS}, augmented, with a uniform "
        f"target over the five classes; their loss weighs {OUTLIER_WEIGHT} x the WBC loss"
    )
    log(f"outlier exposure: {len(fit_half)} non-WBC images x{OUTLIER_REPEATS} with a uniform target")
    return (
        np.concatenate([x_train, x_out]),
        np.concatenate([targets, np.full((len(x_out), n_classes), 1.0 / n_classes, np.float32)]),
        np.concatenate([sample_weights, w_out]),
    )


def recalibrate_batchnorm(
    model: keras.Model, clean_inputs: np.ndarray, batch_size: int = 64, batches: int = 30
) -> None:
    """Set every BatchNormalization layer's moving statistics to their exact average over clean training images.

    During training the moving averages trail weights that keep changing (and see augmented images); inference
    on un-augmented images then uses stale statistics. Averaging over a few batches with the final weights
    ("precise BN") removes that mismatch.
    """
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
        return
    saved = [layer.momentum for layer in layers]
    order = np.random.default_rng(0).permutation(len(clean_inputs))
    for k in range(min(batches, int(np.ceil(len(order) / batch_size)))):
        for layer in layers:
            layer.momentum = k / (k + 1)  # a cumulative mean of the batch statistics
        model(clean_inputs[order[k * batch_size : (k + 1) * batch_size]], training=True)
    for layer, momentum in zip(layers, saved, strict=True):
        layer.momentum = momentum


class _RecalibrateBeforeValidation(keras.callbacks.Callback):
    """Validation (and so early stopping and the checkpoint) sees the model as it will be served."""

    def __init__(self, clean_inputs: np.ndarray):
        super().__init__()
        self.clean_inputs = clean_inputs

    def on_test_begin(self, logs=None):
        recalibrate_batchnorm(self.model, self.clean_inputs)
