"""Adapting a model to a lab's own cells (wbc_ml.adaptation and the adapt_model / evaluate_model commands).

Tiny real Keras models and generated cell images; one slower test adapts a bundled model to the BCCD images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from tests.conftest import BUNDLED_MODELS, TINY_SIZE, build_tiny_model, image_bytes, require_shared_data
from wbc_ml.checksums import file_sha256
from wbc_ml.datasets import WBC_CLASSES

COLOURS = {  # one look per class, so that even an untrained network's features separate them
    "basophil": (90, 40, 150),
    "eosinophil": (230, 110, 90),
    "lymphocyte": (60, 70, 200),
    "monocyte": (170, 150, 200),
    "neutrophil": (200, 120, 160),
}


def make_lab_folder(root: Path, per_class: int | dict[str, int]) -> Path:
    """A lab's folder: ``<class>/<class>_NN.png`` generated cells with some per-image variation."""
    rng = np.random.default_rng(7)
    for name, colour in COLOURS.items():
        count = per_class[name] if isinstance(per_class, dict) else per_class
        (root / name).mkdir(parents=True)
        for i in range(count):
            jitter = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
            size = (int(rng.integers(40, 64)), int(rng.integers(40, 64)))
            (root / name / f"{name}_{i:02d}.png").write_bytes(image_bytes(size=size, color=jitter))
    return root


def make_base_model(folder: Path) -> Path:
    """A tiny real model with its card, like the bundled ones."""
    path = folder / "base.keras"
    build_tiny_model(path)
    card = {
        "name": "Tiny base",
        "architecture": "tiny_cnn",
        "version": "1",
        "file": path.name,
        "sha256": file_sha256(path),
        "input_size": list(TINY_SIZE),
        "normalization": {"method": "scale01"},
        "class_names": list(WBC_CLASSES),
        "temperature": 1.0,
    }
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


@pytest.fixture
def lab(tmp_path) -> tuple[Path, Path]:
    return make_base_model(tmp_path), make_lab_folder(tmp_path / "lab", 12)


SMALL = {"views": 2, "c_grid": (0.1, 1.0), "learning_rates": (1e-3,), "epochs": 2, "folds": 3}


def test_adapting_writes_a_model_that_serves_like_a_bundled_one(lab, tmp_path):
    from wbc_ml import datasets
    from wbc_ml.adaptation import AdaptConfig, adapt_model, choose_cells
    from wbc_ml.inference import ModelSpec, get_classifier
    from wbc_ml.onnx_export import export_onnx
    from wbc_ml.preprocessing import load_path

    base, folder = lab
    cells = choose_cells(datasets.list_images(folder), list(WBC_CLASSES), per_class=5, seed=3)
    out = tmp_path / "adapted" / "lab.keras"
    card = adapt_model(base, cells, out, folder, AdaptConfig(**SMALL, seed=3), command="test", log=lambda _: None)

    assert out.is_file() and out.with_suffix(".json").is_file() and (out.parent / "lab.ood.npz").is_file()
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(card))
    adaptation = card["adaptation"]
    assert adaptation["base_model"]["sha256"] == file_sha256(base)
    assert adaptation["cells_per_class"] == dict.fromkeys(WBC_CLASSES, 5)
    assert {c["method"] for c in adaptation["candidates"]} == {"bn", "head", "finetune"}
    assert adaptation["method"] in {"bn", "head", "finetune"}
    chosen = card["metrics"]["cross_validation"]
    assert chosen["n"] == 25
    assert chosen["accuracy_95ci"][0] <= chosen["accuracy"] <= chosen["accuracy_95ci"][1]
    assert chosen["macro_f1_95ci"][0] <= chosen["macro_f1"] <= chosen["macro_f1_95ci"][1]
    assert card["sha256"] == file_sha256(out) and card["temperature"] > 0

    # Served through wbc_ml.inference exactly like a bundled model: probabilities, a detector score, a flag.
    spec = ModelSpec(
        path=out,
        sha256=card["sha256"],
        input_size=tuple(card["input_size"]),
        normalization=card["normalization"],
        class_names=tuple(card["class_names"]),
        temperature=card["temperature"],
        ood_path=out.parent / card["ood"]["file"],
        ood_sha256=card["ood"]["sha256"],
    )
    classifier = get_classifier(spec)
    assert classifier.ood is not None
    pixels = np.stack([load_path(str(s.path), TINY_SIZE) for s in cells[:4]])
    results = classifier.predict(pixels)
    assert all(r.ood_score is not None and abs(r.probabilities.sum() - 1) < 1e-6 for r in results)
    # ... and through the ONNX export the registry makes.
    assert export_onnx(out, tmp_path / "lab.onnx", TINY_SIZE, card["normalization"]) <= 1e-4


def test_the_new_head_learns_the_labs_classes(lab, tmp_path):
    """A head on an untrained network's features, chosen by CV, classifies cells it never saw."""
    from wbc_ml import datasets
    from wbc_ml.adaptation import AdaptConfig, adapt_model, choose_cells
    from wbc_ml.evaluation import evaluate_saved_model

    base, folder = lab
    cells = choose_cells(datasets.list_images(folder), list(WBC_CLASSES), per_class=6, seed=0)
    out = tmp_path / "head.keras"
    config = AdaptConfig(methods=("head",), c_grid=(1.0,), folds=3)
    card = adapt_model(base, cells, out, folder, config, log=lambda _: None)
    assert card["adaptation"]["method"] == "head"
    before = evaluate_saved_model(base, folder, "all")["accuracy"]
    after = evaluate_saved_model(out, folder, "unseen")
    assert after["n"] == 5 * 12 - 30
    assert after["accuracy"] >= 0.9 > before


def test_cross_validation_and_the_report_use_disjoint_cells(lab, tmp_path):
    base, folder = lab
    out, report = tmp_path / "lab.keras", tmp_path / "m.json"
    call_command(
        "adapt_model", str(base), "--data", str(folder), "--train-per-class", "5", "--seed", "11", "--out", str(out),
        "--method", "head",
    )  # fmt: skip
    card = json.loads(out.with_suffix(".json").read_text())
    used = {f"{name}/{file}" for name, files in card["adaptation"]["cells"].items() for file in files}
    assert len(used) == 25 and card["adaptation"]["cells_per_class"] == dict.fromkeys(WBC_CLASSES, 5)
    assert all(candidate["n"] == 25 for candidate in card["adaptation"]["candidates"])  # CV saw exactly those

    call_command("evaluate_model", str(out), "--data", str(folder), "--split", "unseen", "--json", str(report))
    result = json.loads(report.read_text())
    evaluated = set(result["files"])
    assert len(evaluated) == result["n"] == 60 - 25
    assert not evaluated & used
    assert evaluated | used == {f"{p.parent.name}/{p.name}" for p in folder.glob("*/*.png")}
    assert {"accuracy", "macro_f1", "flagged_share"} <= set(result)
    metrics = result["metrics"]
    assert metrics["flagged_share"] >= metrics["flagged_share_confidence_only"]
    assert result["detectors"] == "lab.ood.npz"

    # Another draw takes other cells; the same seed takes the same ones.
    again = tmp_path / "again.keras"
    call_command(
        "adapt_model", str(base), "--data", str(folder), "--train-per-class", "5", "--seed", "11", "--out", str(again),
        "--method", "bn",
    )  # fmt: skip
    assert json.loads(again.with_suffix(".json").read_text())["adaptation"]["cells"] == card["adaptation"]["cells"]


@pytest.mark.parametrize("cells", [21, 41, 91])
def test_batchnorm_statistics_are_re_estimated_from_any_number_of_cells(cells):
    # 41 cells (10 per class and a rare one) make a full batch and a small last one, merged into it: that crashed.
    import keras

    from wbc_ml.adaptation.network import reestimate_batchnorm
    from wbc_ml.preprocessing import Normalization

    inputs = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.BatchNormalization(name="bn")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(pooled))
    x = np.random.default_rng(cells).integers(0, 256, (cells, 8, 8, 3)).astype(np.uint8)
    assert reestimate_batchnorm(model, x, Normalization.from_dict({"method": "scale01"})) == 1
    moving_mean = np.asarray(model.get_layer("bn").moving_mean)
    assert np.allclose(moving_mean, (x / 255.0).mean(axis=(0, 1, 2)), atol=0.01)


def oof_guesses(labels: np.ndarray, right: int, seed: int) -> np.ndarray:
    """One-hot out-of-fold probabilities that get exactly ``right`` of the cells right (the others off by one)."""
    hits = np.random.default_rng(seed).permutation(len(labels)) < right
    predicted = np.where(hits, labels, (labels + 1) % 5)
    return np.eye(5)[predicted]


@pytest.mark.parametrize(
    ("right", "chosen"),
    [
        ({"bn": 12, "head": 40, "finetune": 42}, "head"),  # fine-tuning wins the CV by less than its noise
        ({"bn": 12, "head": 40, "finetune": 58}, "finetune"),  # ... and by more
        ({"bn": 38, "head": 40, "finetune": 30}, "head"),  # 'bn' close behind is never preferred to the best
        ({"bn": 45, "head": 40, "finetune": 30}, "bn"),  # ... but chosen when it is the best
    ],
)
def test_fine_tuning_is_chosen_over_the_head_only_when_it_wins_by_more_than_the_noise(right, chosen):
    from wbc_ml.adaptation import Candidate, choose
    from wbc_ml.adaptation.cv import oof_summary

    labels = np.repeat(np.arange(5), 12)
    candidates = {}
    for seed, (method, n_right) in enumerate(right.items()):
        probs = oof_guesses(labels, n_right, seed)
        candidates[method] = Candidate(method, {}, probs, oof_summary(labels, probs))
    assert choose(candidates, labels).method == chosen


def test_evaluating_unseen_cells_needs_an_adapted_model(lab):
    base, folder = lab
    with pytest.raises(CommandError, match="needs an adapted model"):
        call_command("evaluate_model", str(base), "--data", str(folder), "--split", "unseen")


def test_fewer_than_five_cells_per_class_are_refused_with_a_clear_message(lab, tmp_path):
    from wbc_ml.adaptation import AdaptationRefused, check_counts

    base, folder = lab
    out = tmp_path / "x.keras"
    with pytest.raises(CommandError, match="--train-per-class 4 is too few: adaptation needs at least 5"):
        call_command("adapt_model", str(base), "--data", str(folder), "--train-per-class", "4", "--out", str(out))
    sparse = make_lab_folder(tmp_path / "sparse", {"basophil": 4, "eosinophil": 6, "lymphocyte": 12,
                                                   "monocyte": 12, "neutrophil": 12})  # fmt: skip
    # Half of 4 basophils and of 6 eosinophils: two classes under 5 cells.
    with pytest.raises(CommandError, match=r"at least 5 per class .*basophil 2, eosinophil 3"):
        call_command("adapt_model", str(base), "--data", str(sparse), "--train-per-class", "5", "--out", str(out))
    assert not out.exists() and not out.with_suffix(".json").exists()
    with pytest.raises(AdaptationRefused, match="No labelled cells for monocyte"):
        check_counts({"basophil": 5, "monocyte": 0})
    # One rare class (a lab with only a few basophils) is accepted and named.
    assert check_counts({"basophil": 1, "eosinophil": 5, "lymphocyte": 9}) == ["basophil"]


def test_a_bundled_model_adapted_to_bccd_beats_the_unadapted_one_on_unseen_cells(tmp_path):
    from wbc_ml import datasets
    from wbc_ml.adaptation import AdaptConfig, adapt_model, choose_cells
    from wbc_ml.evaluation import evaluate_saved_model

    bccd = require_shared_data("bccd")
    base = BUNDLED_MODELS / "enhanced_cnn_v2.keras"
    cells = choose_cells(datasets.list_images(bccd), list(WBC_CLASSES), per_class=10, seed=0)
    out = tmp_path / "bccd.keras"
    adapt_model(base, cells, out, bccd, AdaptConfig(methods=("head",), views=2, c_grid=(0.1,)), log=lambda _: None)
    adapted = evaluate_saved_model(out, bccd, "unseen")
    assert adapted["n"] == 351 - len(cells)
    card = json.loads(out.with_suffix(".json").read_text())
    used = {f"{name}/{file}" for name, files in card["adaptation"]["cells"].items() for file in files}
    assert not set(adapted["files"]) & used
    baseline = evaluate_saved_model(base, bccd, "all")
    assert adapted["accuracy"] > baseline["accuracy"] + 0.2
    assert adapted["flagged_share"] < baseline["flagged_share"]
