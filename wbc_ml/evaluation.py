"""Evaluating a saved model on an image folder, and refitting its non-WBC detectors (TensorFlow).

Used by the ``evaluate_model`` and ``fit_ood`` commands; the same preprocessing and metrics as training.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras

from . import datasets
from .metrics import apply_temperature, classification_report
from .ood import fit_ood
from .preprocessing import Normalization
from .review_flag import DEFAULT_THRESHOLD
from .training import (
    Log,
    evaluate_ood,
    features_and_probs,
    features_of_paths,
    non_wbc_halves,
    ood_card,
    predict_in_batches,
)


def load_card(model_path: Path) -> dict:
    card_path = model_path.with_suffix(".json")
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path} is missing: every model needs its card beside it")
    return json.loads(card_path.read_text())


def evaluate_saved_model(
    model_path: Path, data_dir: Path, split_name: str, threshold: float = DEFAULT_THRESHOLD
) -> dict:
    """Metrics of a saved model on one split of ``data_dir`` (or 'all' of it), through its card's preprocessing."""
    card = load_card(model_path)
    normalization = Normalization.from_dict(card["normalization"])
    class_names = list(card["class_names"])
    samples = datasets.list_images(data_dir, tuple(class_names))
    chosen = samples if split_name == "all" else datasets.split_samples(samples)[split_name]
    x, y = datasets.load_arrays(chosen, tuple(card["input_size"]))
    model = keras.models.load_model(model_path, compile=False)
    raw = predict_in_batches(model, x, normalization)
    probs = apply_temperature(raw, float(card.get("temperature", 1.0)))
    report = classification_report(y, probs, class_names, threshold)
    return {"model": model_path.name, "data": str(data_dir), "split": split_name, "metrics": report}


def refit_ood(model_path: Path, data_dir: Path, log: Log = print) -> dict:
    """Fit the out-of-distribution detectors of an already trained model again and update its card."""
    card = load_card(model_path)
    normalization = Normalization.from_dict(card["normalization"])
    size = tuple(card["input_size"])
    temperature = float(card.get("temperature", 1.0))
    split = datasets.split_samples(datasets.list_images(data_dir, tuple(card["class_names"])))
    model = keras.models.load_model(model_path, compile=False)
    outputs = {}
    for name in ("train", "val", "test"):
        x, y = datasets.load_arrays(split[name], size)
        features, raw = features_and_probs(model, x, normalization)
        outputs[name] = (features, apply_temperature(raw, temperature), y)
        log(f"features of the {name} split: {features.shape}")
    non_wbc_fit, non_wbc_measure = non_wbc_halves(data_dir)
    ood = fit_ood(
        outputs["train"][0],
        outputs["train"][2],
        outputs["val"][0],
        outputs["val"][1].max(axis=1),
        features_of_paths(model, normalization, non_wbc_fit, size, dihedral=True),
    )
    ood_path = (
        model_path.with_name(card["architecture"] + ".ood.npz")
        if not card.get("ood")
        else (model_path.parent / card["ood"]["file"])
    )
    ood.save(ood_path)
    test_features, test_probs, _ = outputs["test"]
    card["ood"] = ood_card(
        ood,
        ood_path,
        evaluate_ood(model, normalization, temperature, ood, test_features, test_probs, non_wbc_measure, size),
        outlier_exposure="outlier_exposure" in card.get("training", {}),
    )
    model_path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card["ood"]
