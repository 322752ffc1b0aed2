"""Evaluating a saved model on an image folder, and refitting its non-WBC detectors (TensorFlow).

Used by the ``evaluate_model`` and ``fit_ood`` commands; the same preprocessing and metrics as training.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import keras
import numpy as np

from . import datasets, turns
from .adaptation.cells import unseen
from .inference import has_feature_layer
from .metrics import MetricsReport, apply_temperature, classification_report
from .ood import OodDetector
from .preprocessing import Normalization
from .review_flag import DEFAULT_THRESHOLD
from .training import (
    Log,
    evaluate_ood,
    features_and_probs,
    fit_detectors,
    non_wbc_parts,
    ood_card,
    predict_in_batches,
)


def load_card(model_path: Path) -> dict:
    card_path = model_path.with_suffix(".json")
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path} is missing: every model needs its card beside it")
    return json.loads(card_path.read_text())


def review_predictions(
    model,
    x: np.ndarray,
    normalization: Normalization,
    temperature: float,
    detector: OodDetector | None,
    quarter_turns: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated probabilities, detector outlier flags) of images, computed as the web app serves them: the
    probabilities averaged over ``quarter_turns`` quarter turns, the detectors on the image as it is."""
    if detector is None or not has_feature_layer(model):
        raw, outliers = predict_in_batches(model, x, normalization), np.zeros(len(x), bool)
    else:
        features, raw = features_and_probs(model, x, normalization)
        outliers = detector.is_outlier(features)
    predict = partial(predict_in_batches, model, normalization=normalization)
    raw = turns.averaged_over_turns(raw, predict, x, quarter_turns)
    return apply_temperature(raw, temperature), outliers


def review_report(
    labels: np.ndarray, probs: np.ndarray, outliers: np.ndarray, class_names: list[str], threshold: float
) -> MetricsReport:
    """The classification report, its flagged share counting the detectors as the web app does."""
    report = classification_report(labels, probs, class_names, threshold)
    by_confidence = probs.max(axis=1) < threshold
    report["flagged_share_confidence_only"] = report["flagged_share"]
    report["flagged_share"] = float((by_confidence | outliers).mean()) if len(labels) else 0.0
    report["flagged_by_detectors_only"] = float((outliers & ~by_confidence).mean()) if len(labels) else 0.0
    report["flagged_counts_detectors"] = True
    return report


def _chosen_samples(card: dict, samples: list[datasets.Sample], split_name: str) -> list[datasets.Sample]:
    if split_name == "all":
        return samples
    if split_name == "unseen":
        adaptation = card.get("adaptation")
        if not adaptation:
            raise ValueError("--split unseen needs an adapted model: its card lists the cells the adaptation used")
        return unseen(samples, list(card["class_names"]), adaptation["cells"])
    return datasets.split_samples(samples)[split_name]


def evaluate_saved_model(
    model_path: Path, data_dir: Path, split_name: str, threshold: float = DEFAULT_THRESHOLD
) -> dict:
    """Metrics of a saved model on one split of ``data_dir`` ('all' of it, or the cells an adaptation did not use).

    Preprocessing, calibration and the review flag (confidence under ``threshold`` OR the detectors beside the
    model) are those of the web app.
    """
    card = load_card(model_path)
    chosen = _chosen_samples(card, datasets.list_images(data_dir, tuple(card["class_names"])), split_name)
    if not chosen:
        raise ValueError(f"no images to evaluate in the {split_name!r} part of {data_dir}")
    ood_file = (card.get("ood") or {}).get("file")
    ood_path = model_path.parent / ood_file if ood_file else None
    result = evaluate_on_samples(model_path, card, ood_path, chosen, threshold)
    return {
        "model": model_path.name,
        "data": str(data_dir),
        "split": split_name,
        **result,
        "detectors": ood_file,
    }


def evaluate_on_samples(
    model_path: Path, card: dict, ood_path: Path | None, samples: list[datasets.Sample], threshold: float
) -> dict:
    """Metrics of a saved model (described by ``card``, its detectors in ``ood_path``) on labelled image files,
    preprocessed, calibrated and flagged for review as the web app does (the detectors counted)."""
    class_names = list(card["class_names"])
    x, y = datasets.load_arrays(samples, tuple(card["input_size"]))
    model = keras.models.load_model(model_path, compile=False)
    detector = OodDetector.load(ood_path) if ood_path else None
    normalization = Normalization.from_dict(card["normalization"])
    probs, outliers = review_predictions(
        model, x, normalization, float(card.get("temperature", 1.0)), detector, int(card.get(turns.CARD_KEY, 1))
    )
    report = review_report(y, probs, outliers, class_names, threshold)
    return {
        "n": report["n"],
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "flagged_share": report["flagged_share"],
        "threshold": threshold,
        "metrics": report,
        "files": [f"{class_names[s.label]}/{s.name}" for s in samples],
    }


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
    non_wbc = non_wbc_parts(data_dir)
    ood, choice = fit_detectors(
        model, normalization, temperature, size, non_wbc, outputs["train"][::2], outputs["val"][:2]
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
        evaluate_ood(model, normalization, temperature, ood, test_features, test_probs, non_wbc.report, size),
        card.get("training", {}).get("outlier_exposure", ""),
        choice,
    )
    card["version"] = detectors_version(str(card.get("version", "1")))
    model_path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card["ood"]


def detectors_version(version: str) -> str:
    """The card version after its detectors were refitted: a registered version never changes its files."""
    base = version.split("+detectors.", maxsplit=1)[0]
    return f"{base}+detectors.{time.strftime('%Y.%m.%d.%H%M', time.gmtime())}"
