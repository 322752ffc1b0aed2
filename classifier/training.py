"""Training the bundled models (TensorFlow/Keras lives here and in inference/saliency only).

Three architectures share one split, one preprocessing path and one model-card format:

* ``enhanced_cnn_v2``: a small CNN trained from scratch, end to end with on-the-fly augmentation and
  outlier exposure (non-WBC cells with a uniform target).
* ``mobilenet_v2_head``: ImageNet MobileNetV2 frozen; a dropout + softmax head on top.
* ``mobilenet_v2_finetuned``: the same, then the last block (``block_16`` and ``Conv_1``) unfrozen
  except its BatchNormalization layers.

On a 2-core CPU the MobileNetV2 models are trained on cached activations: the frozen part of the
backbone (everything up to ``block_15_add``) is run once over several augmented copies of every
training image, and only the layers that can change are trained on that cache. With frozen
BatchNormalization this is mathematically the same network as end-to-end training, at a fraction of
the cost. The saved model is always the whole network, evaluated end to end on the test split.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

from . import datasets
from .inference import detector_features, serving_model
from .metrics import apply_temperature, classification_report, fit_temperature
from .ood import OodDetector, average_pooled, fit_ood, split_non_wbc
from .preprocessing import Normalization

ARCHITECTURES = ("enhanced_cnn_v2", "mobilenet_v2_head", "mobilenet_v2_finetuned")
MOBILENET_SPLIT_LAYER = "block_15_add"
MOBILENET_TRAINABLE_PREFIXES = ("block_16_", "Conv_1")
IMAGENET_NORMALIZATION = Normalization("zscore", (127.5, 127.5, 127.5), (127.5, 127.5, 127.5))
OUTLIER_REPEATS = 4  # outlier exposure (enhanced_cnn_v2): passes over the non-WBC fitting half per epoch
OUTLIER_WEIGHT = 0.5  # their share of the loss relative to the WBC images (lambda in Hendrycks et al.)

Log = Callable[[str], None]


@dataclass
class TrainConfig:
    arch: str
    data_dir: Path
    out_dir: Path
    epochs: int = 40
    batch_size: int = 32
    imagenet_weights: str | None = None
    patience: int = 6
    seed: int = 1234
    input_size: tuple[int, int] | None = None
    augment_copies: int = 4
    finetune_epochs: int = 10
    max_per_class: int | None = None
    cache_dir: Path | None = None
    command: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {ARCHITECTURES}")
        if self.input_size is None:
            self.input_size = (96, 96) if self.arch == "enhanced_cnn_v2" else (224, 224)


# --- augmentation (numpy, on uint8 pixels, before the shared normalisation) -----------------------


def augment_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smear-friendly augmentation: dihedral flips/rotations and mild stain/brightness jitter."""
    out = np.empty(images.shape, dtype=np.float32)
    square = images.shape[1] == images.shape[2]
    for i, image in enumerate(images):
        x = image.astype(np.float32)
        if rng.random() < 0.5:
            x = x[:, ::-1]
        if rng.random() < 0.5:
            x = x[::-1]
        if square:
            x = np.rot90(x, k=int(rng.integers(4)))
        mean = x.mean()
        x = (x - mean) * rng.uniform(0.85, 1.15) + mean  # contrast
        x = x * rng.uniform(0.9, 1.1)  # brightness
        x = x * rng.uniform(0.93, 1.07, size=3).astype(np.float32)  # per-channel stain gain
        out[i] = np.clip(x, 0.0, 255.0)
    return out


class AugmentedBatches(keras.utils.PyDataset):
    def __init__(self, x, y_onehot, weights, batch_size, normalization, seed):
        super().__init__()
        self.x, self.y, self.w = x, y_onehot, weights
        self.batch_size = batch_size
        self.normalization = normalization
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self) -> int:
        return int(np.ceil(len(self.x) / self.batch_size))

    def __getitem__(self, index):
        idx = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        batch = self.normalization.apply(augment_batch(self.x[idx], self.rng))
        return batch, self.y[idx], self.w[idx]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.x))


# --- architectures --------------------------------------------------------------------------------


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
class TrainResult:
    model: keras.Model
    normalization: Normalization
    history: dict
    train_features: np.ndarray  # pooled features of the unaugmented training images (for the OOD score)
    val_features: np.ndarray
    val_probs: np.ndarray  # uncalibrated


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


# --- helpers --------------------------------------------------------------------------------------


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return len(labels) / (n_classes * np.maximum(counts, 1))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def predict_in_batches(model: keras.Model, x: np.ndarray, normalization, batch_size: int = 64):
    outputs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        if normalization is not None:
            chunk = normalization.apply(chunk)
        result = model.predict_on_batch(chunk)
        outputs.append(np.asarray(result))
    return np.concatenate(outputs) if outputs else np.zeros((0,))


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def _hardware() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.platform()})"


# --- the training entry point ---------------------------------------------------------------------


def train(config: TrainConfig, log: Log = print) -> dict:
    """Train one architecture, write ``<arch>.keras`` and ``<arch>.json`` into ``out_dir``."""
    keras.utils.set_random_seed(config.seed)
    started = time.time()
    samples = datasets.list_images(config.data_dir)
    if config.max_per_class:
        samples = [s for label in range(5) for s in [x for x in samples if x.label == label][: config.max_per_class]]
    split = datasets.split_samples(samples)
    log(
        f"{len(samples)} images; train {len(split['train'])}, val {len(split['val'])}, "
        f"test {len(split['test'])} (test is only touched after training)"
    )
    size = config.input_size
    x_train, y_train = datasets.load_arrays(split["train"], size)
    x_val, y_val = datasets.load_arrays(split["val"], size)
    log(f"decoded train+val at {size[0]}x{size[1]} in {time.time() - started:.0f}s")

    n_classes = len(datasets.WBC_CLASSES)
    weights = class_weights(y_train, n_classes)
    trainer = _train_cnn if config.arch == "enhanced_cnn_v2" else _train_mobilenet
    result = trainer(config, x_train, y_train, x_val, y_val, weights, log)
    model, normalization, history = result.model, result.normalization, result.history
    train_seconds = time.time() - started

    config.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = config.out_dir / f"{config.arch}.keras"
    ood_path = config.out_dir / f"{config.arch}.ood.npz"
    model.save(model_path)  # the saved model is uncompiled: no optimizer state travels with it
    served = keras.models.load_model(model_path, compile=False)  # from here on, exactly what is served

    # Calibration and the out-of-distribution detectors are fitted on train/validation (and half of non-WBC).
    temperature = fit_temperature(result.val_probs, y_val)
    non_wbc_fit, non_wbc_measure = non_wbc_halves(config.data_dir)
    non_wbc_features = features_of_paths(served, normalization, non_wbc_fit, size, dihedral=True)
    val_confidence = apply_temperature(result.val_probs, temperature).max(axis=1)
    ood = fit_ood(result.train_features, y_train, result.val_features, val_confidence, non_wbc_features)
    ood.save(ood_path)
    val_probs = result.val_probs
    del x_train

    # Only now is the test split read, once, through the saved file.
    x_test, y_test = datasets.load_arrays(split["test"], size)
    test_features, test_raw = features_and_probs(served, x_test, normalization)
    test_probs = apply_temperature(test_raw, temperature)
    class_names = list(datasets.WBC_CLASSES)
    report = classification_report(y_test, test_probs, class_names)
    uncalibrated = classification_report(y_test, test_raw, class_names)
    val_report = classification_report(y_val, apply_temperature(val_probs, temperature), class_names)
    ood_eval = evaluate_ood(served, normalization, temperature, ood, test_features, test_probs, non_wbc_measure, size)
    if ood_eval:
        log(
            f"OOD: non-WBC (held-out half) flagged {ood_eval['non_wbc_flagged_share']:.1%}, "
            f"WBC test flagged {ood_eval['wbc_flagged_share']:.1%}"
        )

    card = {
        "name": _display_name(config.arch),
        "architecture": config.arch,
        "version": time.strftime("%Y.%m.%d", time.gmtime()),
        "file": model_path.name,
        "sha256": sha256_file(model_path),
        "input_size": list(size),
        "normalization": normalization.to_dict(),
        "class_names": class_names,
        "temperature": round(temperature, 4),
        "parameters": int(model.count_params()),
        "metrics": {"test": report, "test_uncalibrated": uncalibrated, "validation": val_report},
        "calibration": {
            "method": "temperature scaling fitted on the validation split (NLL)",
            "ece_before": uncalibrated["ece"],
            "ece_after": report["ece"],
        },
        "ood": ood_card(ood, ood_path, ood_eval, outlier_exposure="outlier_exposure" in config.extra),
        "data": {
            "source": "PBC dataset: Acevedo A., Merino A., et al. (2020) 'A dataset of microscopic peripheral blood "
            "cell images for development of automatic recognition systems', Data in Brief 30:105474, "
            "doi:10.17632/snkd93bnjr.1 (Hospital Clinic of Barcelona, CellaVision DM96, May-Grunwald-Giemsa, "
            "healthy donors)",
            "images": len(samples),
            "split_rule": datasets.SPLIT_RULE,
            "split_sizes": {k: len(v) for k, v in split.items()},
            "split_sha256": {k: datasets.split_digest(v) for k, v in split.items()},
            "class_counts_train": np.bincount(y_train, minlength=n_classes).tolist(),
        },
        "training": {
            "epochs_run": len(history.get("loss", [])),
            "history": {k: [round(float(v), 5) for v in vals] for k, vals in history.items()},
            "seconds": round(train_seconds),
            "hardware": _hardware(),
            **config.extra,
        },
        "trained_with": {"command": config.command or " ".join(sys.argv), "versions": _versions()},
        "limits": (
            "Trained and tested on one analyser (CellaVision DM96), one stain (May-Grunwald-Giemsa) and healthy "
            "donors from one hospital; accuracy on other analysers, stains, or pathological smears is unknown "
            "until measured on the lab's own images (evaluation runs). Five mature WBC classes only: other cells "
            "are to be caught by the review flag, not classified."
        ),
    }
    card_path = config.out_dir / f"{config.arch}.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    log(f"test accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}; card written to {card_path}")
    return card


def _display_name(arch: str) -> str:
    return {
        "enhanced_cnn_v2": "Enhanced CNNv2",
        "mobilenet_v2_head": "MobileNetV2 (head)",
        "mobilenet_v2_finetuned": "MobileNetV2 (fine-tuned)",
    }[arch]


def features_and_probs(model: keras.Model, x: np.ndarray, normalization: Normalization):
    both = serving_model(model)
    features, probs = [], []
    for start in range(0, len(x), 64):
        f, p = both.predict_on_batch(normalization.apply(x[start : start + 64]))
        features.append(np.asarray(f))
        probs.append(np.asarray(p))
    return np.concatenate(features), np.concatenate(probs)


def non_wbc_halves(data_dir: Path) -> tuple[list[Path], list[Path]]:
    """(fit half, measure half) of ``pbc-non-wbc/`` beside the WBC ``data_dir``; empty when it is absent."""
    non_wbc_dir = Path(data_dir).parent / "pbc-non-wbc"
    if not non_wbc_dir.is_dir():
        return [], []
    paths = sorted(p for p in non_wbc_dir.rglob("*") if p.suffix.lower() in datasets.IMAGE_SUFFIXES)
    return split_non_wbc(paths)


def dihedral_views(x: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and quarter turns of a batch of NxHxWx3 images (a smear has no up or left)."""
    turns = [np.rot90(x, k, axes=(1, 2)) for k in range(4)]
    return [np.ascontiguousarray(v) for t in turns for v in (t, t[:, :, ::-1])]


def features_of_paths(model, normalization, paths: list[Path], size, dihedral: bool = False) -> np.ndarray | None:
    """Detector features of image files; with ``dihedral``, of each image's 8 views (8 rows per image)."""
    if not paths:
        return None
    x, _ = datasets.load_arrays([datasets.Sample(p, -1) for p in paths], size)
    if dihedral:
        x = np.concatenate(dihedral_views(x))  # rows view by view; one pass through one serving model
    return features_and_probs(model, x, normalization)[0]


def evaluate_ood(model, normalization, temperature, ood, wbc_features, wbc_probs, non_wbc_paths, size, threshold=0.85):
    """Share of held-out non-WBC images flagged for review versus share of WBC test images flagged."""
    if not non_wbc_paths:
        return {}
    x, _ = datasets.load_arrays([datasets.Sample(p, -1) for p in non_wbc_paths], size)
    features, raw = features_and_probs(model, x, normalization)
    probs = apply_temperature(raw, temperature)
    kinds = np.array([p.parent.name for p in non_wbc_paths])
    non_wbc_flagged = (probs.max(axis=1) < threshold) | ood.is_outlier(features)
    wbc_flagged = (wbc_probs.max(axis=1) < threshold) | ood.is_outlier(wbc_features)
    return {
        "evaluated_on": f"{len(non_wbc_paths)} held-out images of pbc-non-wbc/ and the WBC test split",
        "threshold": threshold,
        "non_wbc_flagged_share": float(non_wbc_flagged.mean()),
        "non_wbc_flagged_by_kind": {k: float(non_wbc_flagged[kinds == k].mean()) for k in sorted(set(kinds))},
        "non_wbc_flagged_by_confidence_only": float((probs.max(axis=1) < threshold).mean()),
        "wbc_flagged_share": float(wbc_flagged.mean()),
        "wbc_flagged_by_confidence_only": float((wbc_probs.max(axis=1) < threshold).mean()),
    }


def ood_card(ood: OodDetector, ood_path: Path, ood_eval: dict, outlier_exposure: bool = False) -> dict:
    exposure = (
        "The classifier itself was trained with outlier exposure (training.outlier_exposure): it learned to spread "
        "its confidence over the five classes for the fitting half of pbc-non-wbc/. "
    )
    return {
        "method": (exposure if outlier_exposure else "") + ood.describe(),
        "file": ood_path.name,
        "sha256": sha256_file(ood_path),
        "distance_threshold": ood.distance_threshold,
        "probability_threshold": ood.probability_threshold if ood.has_network else None,
        **ood_eval,
    }


def _train_cnn(config, x_train, y_train, x_val, y_val, weights, log):
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
    train_data = AugmentedBatches(x_fit, y_fit, w_fit, config.batch_size, normalization, config.seed)
    val_x = normalization.apply(x_val)
    val_y = np.eye(n_classes, dtype=np.float32)[y_val]
    checkpoint = config.out_dir / f".{config.arch}.checkpoint.weights.h5"
    config.out_dir.mkdir(parents=True, exist_ok=True)
    clean_train = normalization.apply(x_train[np.random.default_rng(config.seed).permutation(len(x_train))[:1920]])
    callbacks = [
        _RecalibrateBeforeValidation(clean_train),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2, min_lr=1e-5),
        keras.callbacks.ModelCheckpoint(
            str(checkpoint), monitor="val_loss", save_best_only=True, save_weights_only=True
        ),
        _EpochLog(log),
    ]
    history = model.fit(
        train_data, validation_data=(val_x, val_y), epochs=config.epochs, callbacks=callbacks, verbose=0
    )
    checkpoint.unlink(missing_ok=True)
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

    Outlier exposure (Hendrycks et al., ICLR 2019): the fitting half of ``pbc-non-wbc/`` (never the measuring
    half) joins training with a *uniform* target over the five classes, so the network learns to be unsure
    about platelets, erythroblasts and immature granulocytes instead of calling them a confident neutrophil.
    The outliers are repeated ``OUTLIER_REPEATS`` times (each time freshly augmented) and weighted so that
    their loss counts ``OUTLIER_WEIGHT`` times the WBC loss, the paper's lambda.
    """
    n_classes = len(weights)
    targets = np.eye(n_classes, dtype=np.float32)[y_train]
    sample_weights = weights[y_train].astype(np.float32)
    fit_half, _ = non_wbc_halves(config.data_dir)
    if not fit_half:
        return x_train, targets, sample_weights
    x_out, _ = datasets.load_arrays([datasets.Sample(p, -1) for p in fit_half], config.input_size)
    x_out = np.concatenate([x_out] * OUTLIER_REPEATS)
    w_out = np.full(len(x_out), OUTLIER_WEIGHT * sample_weights.sum() / len(x_out), np.float32)
    config.extra["outlier_exposure"] = (
        f"{len(fit_half)} images (the fitting half of pbc-non-wbc/) x{OUTLIER_REPEATS}, augmented, with a uniform "
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


class _EpochLog(keras.callbacks.Callback):
    def __init__(self, log: Log, prefix: str = ""):
        super().__init__()
        self.log, self.prefix, self.started = log, prefix, time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = "  ".join(f"{k}={v:.4f}" for k, v in logs.items() if isinstance(v, float | int))
        self.log(f"{self.prefix}epoch {epoch + 1}: {parts}  ({time.time() - self.started:.0f}s elapsed)")


def _mobilenet_cache(config, parts, x_train, y_train, x_val, log):
    """block_15 activations for ``augment_copies`` augmented copies of train and for plain val."""
    key = hashlib.sha256(
        json.dumps(
            [
                config.input_size,
                config.augment_copies,
                config.seed,
                len(x_train),
                config.max_per_class,
                str(config.imagenet_weights),
            ]
        ).encode()
    ).hexdigest()[:16]
    cache_file = config.cache_dir / f"mobilenet_cache_{key}.npz" if config.cache_dir else None
    if cache_file and cache_file.exists():
        log(f"reusing activation cache {cache_file}")
        data = np.load(cache_file)
        return data["train"], data["train_labels"], data["val"]
    rng = np.random.default_rng(config.seed)
    started = time.time()
    chunks, labels = [], []
    for copy in range(config.augment_copies):
        for start in range(0, len(x_train), 64):
            batch = x_train[start : start + 64]
            pixels = batch.astype(np.float32) if copy == 0 else augment_batch(batch, rng)
            chunks.append(np.asarray(parts.trunk.predict_on_batch(IMAGENET_NORMALIZATION.apply(pixels)), np.float16))
            labels.append(y_train[start : start + 64])
        log(f"cached augmented copy {copy + 1}/{config.augment_copies} ({time.time() - started:.0f}s)")
    train_acts = np.concatenate(chunks)
    train_labels = np.concatenate(labels)
    val_acts = predict_in_batches(parts.trunk, x_val, IMAGENET_NORMALIZATION).astype(np.float16)
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, train=train_acts, train_labels=train_labels, val=val_acts)
    return train_acts, train_labels, val_acts


def _train_mobilenet(config, x_train, y_train, x_val, y_val, weights, log):
    parts = build_mobilenet_v2(config.input_size, config.imagenet_weights or "imagenet")
    train_acts, train_labels, val_acts = _mobilenet_cache(config, parts, x_train, y_train, x_val, log)
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
                _EpochLog(log, prefix),
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
        f"{config.augment_copies} cached copies of each training image (the first unaugmented; the rest random "
        "flips, 90-degree rotations, contrast/brightness and per-channel stain jitter)"
    )
    for layer in parts.full.layers:
        layer.trainable = False
    plain = train_acts[: len(x_train)]  # copy 0 is the unaugmented training set
    train_features = predict_in_batches(parts.top_features, plain, None, batch_size=256)
    val_features = predict_in_batches(parts.top_features, val_acts, None, batch_size=256)
    val_probs = predict_in_batches(parts.top, val_acts, None, batch_size=256)
    return TrainResult(parts.full, IMAGENET_NORMALIZATION, history, train_features, val_features, val_probs)
