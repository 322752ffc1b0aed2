"""Writing an adapted model: OUT.keras, its card OUT.json and its detectors OUT.ood.npz."""

from __future__ import annotations

import getpass
import json
import sys
import time
from pathlib import Path

import keras
import numpy as np

from .. import datasets, turns
from ..checksums import file_sha256
from ..training.cards import hardware, versions
from ..training.config import Log
from .cells import cell_key, files_digest
from .detectors import LAB_DISTANCE_QUANTILE
from .pipeline import CHOICE_RULE, Adaptation, AdaptConfig, Adapted, choose, non_wbc_sample
from .progress import SAVE_UNITS, Progress

NON_WBC_PER_KIND = 50

METHOD_TEXT = {
    "bn": "BatchNormalization statistics re-estimated on the lab's adaptation cells (label-free); head unchanged",
    "head": "a new class-balanced logistic-regression head (softmax Dense on the 'gap' features) fitted on the "
    "pooled features of the flips and quarter turns of each cell (served on the image alone or averaged over its "
    "quarter turns: the card's quarter_turns)",
    "finetune": "BatchNormalization re-estimated on the lab's cells, then the last block (frozen BatchNormalization) "
    "and a new head (started from the logistic-regression head) trained on cached trunk activations of the "
    "flips and quarter turns of each cell, class-balanced, Adam",
}


def adapt_model(
    base_path: Path,
    cells: list[datasets.Sample],
    out_path: Path,
    data_dir: Path,
    config: AdaptConfig | None = None,
    command: str = "",
    log: Log = print,
    *,
    base_card: dict | None = None,
    non_wbc_paths: list[Path] | None = None,
    progress: Progress | None = None,
    started_by: str | None = None,
) -> dict:
    """Adapt ``base_path`` to ``cells`` (of ``data_dir``), choose by cross-validation, write the three files.

    ``base_card`` (default: the card beside ``base_path``), ``non_wbc_paths`` (default: a sample of the fitting part
    of ``pbc-non-wbc/`` beside ``data_dir``) and ``started_by`` (default: the system user) let a caller that keeps
    them elsewhere (the web job) say them; ``progress`` is told of every step and may stop the adaptation by raising
    :class:`.progress.Cancelled` before anything is written.
    """
    from ..evaluation import load_card  # evaluation imports this package (the cells' rule): no import cycle

    config = config or AdaptConfig()
    progress = progress or Progress()
    started = time.time()
    base_card = base_card or load_card(base_path)
    size = tuple(base_card["input_size"])
    x, labels = datasets.load_arrays(cells, size)
    if non_wbc_paths is None:
        non_wbc_paths = non_wbc_sample(data_dir, NON_WBC_PER_KIND)
    non_wbc = datasets.load_arrays([datasets.Sample(p, -1) for p in non_wbc_paths], size)[0] if non_wbc_paths else None
    adaptation = Adaptation(base_path, base_card, x, labels, non_wbc, config, log, progress=progress)
    candidates = adaptation.candidates()
    adapted = adaptation.finalize(choose(candidates, labels, config.seed))
    adapted.candidates = candidates
    progress.at("writing the model and its card")
    card = write_adapted(
        adapted, base_path, base_card, cells, out_path, non_wbc_paths, config, time.time() - started, command,
        started_by,
    )  # fmt: skip
    progress.advance("model and card written", SAVE_UNITS)
    log(f"wrote {out_path} ({card['adaptation']['method']}) in {card['adaptation']['seconds']:.0f}s")
    return card


def _cv_entry(candidate) -> dict:
    return {"method": candidate.method, "params": candidate.params, **candidate.cv}


def write_adapted(
    adapted: Adapted,
    base_path: Path,
    base_card: dict,
    cells: list[datasets.Sample],
    out_path: Path,
    non_wbc_paths: list[Path],
    config: AdaptConfig,
    seconds: float,
    command: str,
    started_by: str | None = None,
) -> dict:
    class_names = list(base_card["class_names"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    adapted.model.save(out_path)
    served = keras.models.load_model(out_path, compile=False)  # what is served must be loadable as saved
    ood_path = out_path.with_name(out_path.stem + ".ood.npz")
    adapted.detector.save(ood_path)
    files = {name: sorted(s.name for s in cells if s.label == i) for i, name in enumerate(class_names)}
    candidate = adapted.candidate
    card = {
        "name": f"{base_card['name']} adapted ({out_path.stem})",
        "architecture": base_card["architecture"],
        "version": time.strftime("%Y.%m.%d.%H%M%S", time.gmtime()),
        "file": out_path.name,
        "sha256": file_sha256(out_path),
        "input_size": list(base_card["input_size"]),
        "normalization": base_card["normalization"],
        "class_names": class_names,
        "temperature": round(adapted.temperature, 4),
        turns.CARD_KEY: int(candidate.params.get("quarter_turns", 1)),
        "parameters": int(served.count_params()),
        "metrics": {"cross_validation": _cv_entry(candidate)},
        "calibration": {
            "method": "temperature scaling fitted on the chosen method's out-of-fold probabilities (NLL)",
        },
        "ood": {
            "method": (
                "Flagged for review when the calibrated confidence is below the threshold, OR the Mahalanobis distance "
                "of the pooled features to the nearest class mean (fitted on every view of the lab's cells) exceeds "
                f"the {LAB_DISTANCE_QUANTILE:.0%} quantile of the lab's out-of-fold distances"
                + (
                    f", OR the non-WBC network (the lab's cells versus {len(non_wbc_paths)} images of the fitting part "
                    "of pbc-non-wbc/) says 'not a WBC' above a threshold set on out-of-fold scores of the lab's cells"
                    if adapted.detector.has_network
                    else ""
                )
                + "."
            ),
            "file": ood_path.name,
            "sha256": file_sha256(ood_path),
            "distance_threshold": adapted.detector.distance_threshold,
            "probability_threshold": adapted.detector.probability_threshold if adapted.detector.has_network else None,
            "non_wbc_files": sorted(f"{p.parent.name}/{p.name}" for p in non_wbc_paths),
            **adapted.detector_summary,
        },
        "adaptation": {
            "base_model": {"file": base_path.name, "name": base_card["name"], "sha256": file_sha256(base_path)},
            "method": candidate.method,
            "method_description": METHOD_TEXT[candidate.method],
            "params": candidate.params,
            "chosen_by": (
                f"{CHOICE_RULE}, in a stratified {adapted.folds}-fold cross-validation over the adaptation cells only"
            ),
            "candidates": [_cv_entry(c) for c in adapted.candidates.values()],
            "config": {
                "methods": list(config.methods),
                "views": config.views,
                "quarter_turns": list(config.quarter_turns),
                "c_grid": list(config.c_grid),
                "poolings": list(config.poolings),
                "learning_rates": list(config.learning_rates),
                "epochs": config.epochs,
                "folds": config.folds,
                "seed": config.seed,
            },
            "cells": files,
            "cells_per_class": {name: len(v) for name, v in files.items()},
            "cells_sha256": files_digest([cell_key(s.path, class_names[s.label]) for s in cells]),
            "seconds": round(seconds, 1),
            "hardware": hardware(),
            "started_by": started_by or getpass.getuser(),
            "command": command or " ".join(sys.argv),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "trained_with": {"command": command or " ".join(sys.argv), "versions": versions()},
        "limits": (
            "Adapted on the cells listed in adaptation.cells only; the cross-validation metrics are estimates on those "
            "cells. Measure on the lab's other labelled cells with 'evaluate_model --split unseen' before use."
        ),
    }
    out_path.with_suffix(".json").write_text(json.dumps(card, indent=2, default=_json_default) + "\n")
    return card


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
