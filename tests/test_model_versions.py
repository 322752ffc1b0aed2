"""A registered model version never changes its files; a new version retires the old one and takes over defaults."""

import json
import shutil

import pytest

from classifier.models import ClassifierModel
from classifier.registry import CardError, register_card
from wbc_ml.checksums import file_sha256
from wbc_ml.evaluation import detectors_version


def _card(models_dir, version: str):
    path = models_dir / "tiny.json"
    model = models_dir / "tiny.keras"
    card = {
        "name": "Tiny CNN",
        "architecture": "tiny",
        "version": version,
        "file": model.name,
        "sha256": file_sha256(model),
        "input_size": [32, 32],
        "normalization": {"method": "scale01"},
        "class_names": ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"],
    }
    path.write_text(json.dumps(card))
    return path


@pytest.mark.django_db
def test_a_changed_file_under_a_registered_version_is_refused_and_nothing_changes(models_dir, tmp_path):
    record, created = register_card(_card(models_dir, "1"), convert_onnx=False)
    assert created
    other = tmp_path / "other.keras"
    from tests.conftest import build_tiny_model

    build_tiny_model(other, seed=7)
    shutil.copy(other, models_dir / "tiny.keras")
    with pytest.raises(CardError, match="needs a new version"):
        register_card(_card(models_dir, "1"), convert_onnx=False)
    record.refresh_from_db()
    assert record.sha256 != file_sha256(models_dir / "tiny.keras")  # the registered row still names the old file


@pytest.mark.django_db
def test_a_new_version_retires_the_old_one_and_takes_over_lab_and_user_defaults(models_dir, lab_a, technologist):
    old, _ = register_card(_card(models_dir, "1"), convert_onnx=False)
    lab_a.default_model = old
    lab_a.save()
    technologist.default_model = old
    technologist.save()

    new, created = register_card(_card(models_dir, detectors_version("1")), convert_onnx=False)

    assert created and new.version.startswith("1+detectors.")
    old.refresh_from_db()
    lab_a.refresh_from_db()
    technologist.refresh_from_db()
    assert not old.is_active and ClassifierModel.objects.filter(pk=old.pk).exists()  # kept for the results naming it
    assert lab_a.default_model == new and technologist.default_model == new


def test_refitting_detectors_twice_does_not_stack_version_suffixes():
    once = detectors_version("2025.11.20")
    assert once.startswith("2025.11.20+detectors.") and len(once) <= 40
    assert detectors_version(once).count("+detectors.") == 1
