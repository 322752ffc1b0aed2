"""Training the MobileNetV2 models on cached activations: the head, then (fine-tuned) the last block."""

from __future__ import annotations

import keras
import numpy as np

from ..ood import average_pooled
from .activation_cache import IMAGENET_NORMALIZATION, mobilenet_activations
from .architectures import build_mobilenet_v2, unfreeze_last_block
from .augmentation import AUGMENTATIONS
from .common import EpochLog, TrainResult, predict_in_batches


def train_mobilenet(config, x_train, y_train, x_val, y_val, weights, log):
    parts = build_mobilenet_v2(config.input_size, config.imagenet_weights or "imagenet")
    train_acts, train_labels, val_acts = mobilenet_activations(config, parts, x_train, y_train, x_val, log)
    n_classes = len(weights)
    y_train_1h = np.eye(n_classes, dtype=np.float32)[train_labels]
    y_val_1h = np.eye(n_classes, dtype=np.float32)[y_val]
    sample_weights = weights[train_labels].astype(np.float32)

    def fit(model, x, x_val_, learning_rate, epochs, prefix):
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate), loss="categorical_crossentropy", metrics=["accuracy"]
        )
        return model.fit(
            x,
            y_train_1h,
            sample_weight=sample_weights,
            validation_data=(x_val_, y_val_1h),
            batch_size=config.batch_size,
            epochs=epochs,
            shuffle=True,
            verbose=0,
            callbacks=[
                keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
                EpochLog(log, prefix),
            ],
        ).history

    # Phase 1, the head: with everything below it frozen, train it on the average-pooled features directly
    # (the first half of the detector features; the second half, max pooling, only serves the detectors).
    pooled_train = average_pooled(predict_in_batches(parts.top_features, train_acts, None, batch_size=256))
    pooled_val = average_pooled(predict_in_batches(parts.top_features, val_acts, None, batch_size=256))
    head_input = keras.Input(shape=(pooled_train.shape[1],), name="pooled_features")
    head = keras.Model(
        head_input, parts.full.get_layer("probabilities")(parts.full.get_layer("head_dropout")(head_input))
    )
    history = fit(head, pooled_train, pooled_val, 1e-4, config.epochs, "head ")
    if config.arch == "mobilenet_v2_finetuned":
        # Phase 2: unfreeze the last block (not its BatchNormalization) and train it with the head.
        unfrozen = [name for name in unfreeze_last_block(parts) if parts.full.get_layer(name).weights]
        log(f"fine-tuning {', '.join(unfrozen)} (BatchNormalization stays frozen)")
        fine = fit(parts.top, train_acts, val_acts, 1e-5, config.finetune_epochs, "fine-tune ")
        history = {k: history[k] + fine.get(k, []) for k in history}
        config.extra["unfrozen_layers"] = unfrozen
        config.extra["finetune_epochs_run"] = len(fine.get("loss", []))
    config.extra["augmentation"] = (
        f"{config.augment_copies} cached copies of each training image (the first unaugmented; the rest "
        f"{AUGMENTATIONS[config.augmentation]})"
    )
    for layer in parts.full.layers:
        layer.trainable = False
    plain = train_acts[: len(x_train)]  # copy 0 is the unaugmented training set
    train_features = predict_in_batches(parts.top_features, plain, None, batch_size=256)
    val_features = predict_in_batches(parts.top_features, val_acts, None, batch_size=256)
    val_probs = predict_in_batches(parts.top, val_acts, None, batch_size=256)
    return TrainResult(parts.full, IMAGENET_NORMALIZATION, history, train_features, val_features, val_probs)
