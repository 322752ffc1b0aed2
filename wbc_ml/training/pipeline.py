"""One training run: split, train, calibrate, fit the detectors, test once, write the model and its card."""

from __future__ import annotations

import json
import sys
import time

import keras
import numpy as np

from .. import datasets
from ..checksums import file_sha256
from ..metrics import apply_temperature, classification_report, fit_temperature
from .cards import display_name, hardware, versions
from .cnn import train_cnn
from .common import class_weights, features_and_probs
from .config import Log, TrainConfig
from .detectors import evaluate_ood, fit_detectors, non_wbc_parts, ood_card
from .mobilenet import train_mobilenet


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
    trainer = train_cnn if config.arch == "enhanced_cnn_v2" else train_mobilenet
    result = trainer(config, x_train, y_train, x_val, y_val, weights, log)
    model, normalization, history = result.model, result.normalization, result.history
    train_seconds = time.time() - started

    config.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = config.out_dir / f"{config.arch}.keras"
    ood_path = config.out_dir / f"{config.arch}.ood.npz"
    model.save(model_path)  # the saved model is uncompiled: no optimizer state travels with it
    served = keras.models.load_model(model_path, compile=False)  # from here on, exactly what is served

    # Calibration and the out-of-distribution detectors are fitted on train/validation and the fit and choose thirds
    # of non-WBC; the report third is read only after.
    temperature = fit_temperature(result.val_probs, y_val)
    non_wbc = non_wbc_parts(config.data_dir)
    val_calibrated = apply_temperature(result.val_probs, temperature)
    ood, choice = fit_detectors(
        served,
        normalization,
        temperature,
        size,
        non_wbc,
        (result.train_features, y_train),
        (result.val_features, val_calibrated),
    )
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
    ood_eval = evaluate_ood(served, normalization, temperature, ood, test_features, test_probs, non_wbc.report, size)
    if ood_eval:
        log(
            f"OOD: non-WBC (report third) flagged {ood_eval['non_wbc_flagged_share']:.1%}, "
            f"WBC test flagged {ood_eval['wbc_flagged_share']:.1%}"
        )

    card = {
        "name": display_name(config.arch),
        "architecture": config.arch,
        "version": time.strftime("%Y.%m.%d", time.gmtime()),
        "file": model_path.name,
        "sha256": file_sha256(model_path),
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
        "ood": ood_card(ood, ood_path, ood_eval, config.extra.get("outlier_exposure", ""), choice),
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
            "hardware": hardware(),
            **config.extra,
        },
        "trained_with": {"command": config.command or " ".join(sys.argv), "versions": versions()},
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
