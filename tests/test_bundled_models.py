"""The committed models: files match their cards, load, and perform on real images as the cards say."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BUNDLED_MODELS, require_shared_data
from tests.test_training import saved_without_optimizer
from wbc_ml import datasets
from wbc_ml.checksums import file_sha256
from wbc_ml.inference import get_classifier
from wbc_ml.preprocessing import load_path

CARDS = sorted(BUNDLED_MODELS.glob("*.json"))
ARCHITECTURES = {"enhanced_cnn_v2", "mobilenet_v2_head", "mobilenet_v2_finetuned"}


def _card(path: Path) -> dict:
    return json.loads(path.read_text())


def test_all_three_models_are_bundled():
    assert {_card(p)["architecture"] for p in CARDS} == ARCHITECTURES


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.stem)
def test_model_file_matches_its_card(card_path):
    card = _card(card_path)
    model_file = card_path.parent / card["file"]
    assert file_sha256(model_file) == card["sha256"]
    assert card["class_names"] == list(datasets.WBC_CLASSES)
    assert len(card["input_size"]) == 2 and card["normalization"]["method"] in ("scale01", "zscore")
    assert card["temperature"] > 0
    ood_file = card_path.parent / card["ood"]["file"]
    assert file_sha256(ood_file) == card["ood"]["sha256"]
    test = card["metrics"]["test"]
    assert test["n"] == card["data"]["split_sizes"]["test"] > 1000
    assert "Acevedo" in card["data"]["source"] and card["data"]["split_rule"]
    assert saved_without_optimizer(model_file)


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.stem)
def test_model_loads_with_the_cards_input_size(card_path):
    import keras

    card = _card(card_path)
    model = keras.models.load_model(card_path.parent / card["file"], compile=False, safe_mode=True)
    assert tuple(model.input_shape) == (None, *card["input_size"], 3)
    assert tuple(model.output_shape) == (None, 5)


def _registered(card_path, settings, tmp_path):
    from classifier.registry import register_card

    settings.WBC_MODELS_DIR = BUNDLED_MODELS
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    record, _ = register_card(card_path)  # converts to ONNX and checks agreement, as a real install does
    return record


def _test_sample(per_class: int):
    pbc = require_shared_data()
    test_split = datasets.split_samples(datasets.list_images(pbc))["test"]
    return [s for label in range(5) for s in [t for t in test_split if t.label == label][:per_class]]


@pytest.mark.slow
@pytest.mark.django_db
@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.stem)
def test_model_classifies_real_test_images_at_its_cards_accuracy(card_path, settings, tmp_path):
    sample = _test_sample(per_class=16)
    record = _registered(card_path, settings, tmp_path)
    assert record.onnx_file_name, record.onnx_status  # served by ONNX Runtime
    classifier = get_classifier(record.spec())
    pixels = np.stack([load_path(str(s.path), record.input_size) for s in sample])
    results = classifier.predict(pixels)
    accuracy = np.mean([r.class_index == s.label for r, s in zip(results, sample, strict=True)])
    card = _card(card_path)
    card_accuracy = card["metrics"]["test"]["accuracy"]
    assert accuracy >= card_accuracy - 0.06, f"{accuracy:.3f} on 80 test images vs {card_accuracy:.3f} in the card"
    flagged = np.mean([r.confidence < 0.85 or r.is_outlier for r in results])
    assert flagged <= card["ood"]["wbc_flagged_share"] + 0.08, f"{flagged:.3f} of 80 WBC flagged for review"


@pytest.mark.slow
@pytest.mark.django_db
@pytest.mark.parametrize("architecture", ["enhanced_cnn_v2", "mobilenet_v2_finetuned"])
def test_model_flags_held_out_non_wbc_cells_for_review(architecture, settings, tmp_path):
    from wbc_ml.ood import split_non_wbc

    non_wbc = Path(require_shared_data()).parent / "pbc-non-wbc"
    paths = sorted(p for p in non_wbc.rglob("*.jpg"))
    held_out = split_non_wbc(paths).report
    card_path = BUNDLED_MODELS / f"{architecture}.json"
    record = _registered(card_path, settings, tmp_path)
    classifier = get_classifier(record.spec())
    pixels = np.stack([load_path(str(p), record.input_size) for p in held_out[::3]])
    flagged = np.mean([r.confidence < 0.85 or r.is_outlier for r in classifier.predict(pixels)])
    expected = _card(card_path)["ood"]["non_wbc_flagged_share"]
    assert flagged >= expected - 0.1, f"{flagged:.2f} flagged vs {expected:.2f} in the card"
