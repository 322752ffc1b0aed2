"""Model cards (JSON beside each model file) and registering them as ClassifierModel rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model

from accounts.models import Laboratory
from wbc_ml.checksums import file_sha256
from wbc_ml.onnx_export import export_onnx, fallback_status, onnx_file_name, served_status
from wbc_ml.preprocessing import Normalization

from .models import ClassifierModel

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("name", "architecture", "file", "sha256", "input_size", "normalization", "class_names")


class CardError(ValueError):
    pass


def read_card(card_path: Path) -> dict:
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CardError(f"{card_path.name}: not readable JSON ({exc})") from exc
    missing = [f for f in REQUIRED_FIELDS if f not in card]
    if missing:
        raise CardError(f"{card_path.name}: missing {', '.join(missing)}")
    try:
        Normalization.from_dict(card["normalization"])
    except ValueError as exc:
        raise CardError(f"{card_path.name}: {exc}") from exc
    size = card["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise CardError(f"{card_path.name}: input_size must be [height, width]")
    return card


def register_card(
    card_path: Path, *, verify_file: bool = True, convert_onnx: bool = True
) -> tuple[ClassifierModel, bool]:
    """Create or update the bundled model described by ``card_path``; returns (record, created)."""
    card = read_card(card_path)
    model_file = card_path.parent / card["file"]
    if not model_file.is_file():
        raise CardError(f"{card_path.name}: model file {card['file']} is missing")
    if verify_file and file_sha256(model_file) != card["sha256"]:
        raise CardError(f"{card_path.name}: {card['file']} does not match the card's sha256")
    ood = card.get("ood") or {}
    ood_file = card_path.parent / ood["file"] if ood.get("file") else None
    if ood_file is not None:  # the detectors decide the review flag: a card's detector must be there, unaltered
        if not ood_file.is_file():
            raise CardError(f"{card_path.name}: detector file {ood['file']} is missing")
        if not ood.get("sha256") or (verify_file and file_sha256(ood_file) != ood["sha256"]):
            raise CardError(f"{card_path.name}: {ood['file']} does not match the card's ood sha256")
    test_metrics = (card.get("metrics") or {}).get("test") or {}
    defaults = {
        "architecture": card["architecture"],
        "file_name": card["file"],
        "sha256": card["sha256"],
        "input_height": card["input_size"][0],
        "input_width": card["input_size"][1],
        "normalization": card["normalization"],
        "class_names": card["class_names"],
        "temperature": float(card.get("temperature", 1.0)),
        "ood_file_name": ood["file"] if ood_file is not None else "",
        "ood_sha256": ood["sha256"] if ood_file is not None else "",
        "parameters": card.get("parameters"),
        "test_accuracy": test_metrics.get("accuracy"),
        "card": card,
        "is_bundled": True,
        "laboratory": None,
    }
    version = str(card.get("version", "1"))
    registered = ClassifierModel.objects.filter(name=card["name"], version=version).first()
    if registered is not None and (registered.sha256, registered.ood_sha256) != (
        defaults["sha256"],
        defaults["ood_sha256"],
    ):
        raise CardError(
            f"{card_path.name}: {card['name']} v{version} is registered with other files (model sha256 "
            f"{registered.sha256[:12]}…, detectors {registered.ood_sha256[:12] or 'none'}…); a changed model or "
            "detector file needs a new version in its card"
        )
    record, created = ClassifierModel.objects.update_or_create(name=card["name"], version=version, defaults=defaults)
    if created:
        retire_older_versions(record)
    if convert_onnx:
        ensure_onnx(record)
    return record, created


def retire_older_versions(record: ClassifierModel) -> None:
    """Older bundled versions of the model stop being offered (their rows, and the results that name them, stay);
    labs and users whose default was one of them get the new version."""
    older = ClassifierModel.objects.filter(name=record.name, is_bundled=True).exclude(pk=record.pk)
    Laboratory.objects.filter(default_model__in=older).update(default_model=record)
    get_user_model().objects.filter(default_model__in=older).update(default_model=record)
    older.update(is_active=False)


def bundled_cards(models_dir: Path) -> list[Path]:
    return sorted(p for p in Path(models_dir).glob("*.json") if not p.name.startswith("."))


def ensure_onnx(record) -> None:
    """Give a bundled model its checked ONNX copy and record its sha256, or record why it serves with TensorFlow.

    This loads the model file with Keras, so it is for our own bundled files only (``register_models``). An
    uploaded model gets its ONNX copy from the vetting child (:mod:`classifier.custom_models`), never here.
    """
    if not record.is_bundled:
        raise ValueError(f"{record} is an uploaded model: its ONNX copy is made by the vetting child")
    onnx_name = onnx_file_name(f"{record.sha256[:20]}-{record.pk}")  # one copy per row: never shared
    onnx_path = Path(settings.WBC_ONNX_DIR) / onnx_name
    if record.onnx_file_name == onnx_name and record.onnx_sha256 and _matches(onnx_path, record.onnx_sha256):
        return
    try:
        if file_sha256(record.path) != record.sha256:
            raise CardError(f"{record.file_name} does not match its registered sha256")
        difference = export_onnx(record.path, onnx_path, record.input_size, record.normalization)
    except Exception as exc:  # any failure means: serve with TensorFlow, and say why
        record.onnx_file_name, record.onnx_sha256 = "", ""
        record.onnx_status = fallback_status(exc)
        logger.warning("%s: ONNX export not used (%s); serving with TensorFlow", record, exc)
    else:
        record.onnx_file_name, record.onnx_sha256 = onnx_name, file_sha256(onnx_path)
        record.onnx_status = served_status(difference)
    record.save(update_fields=["onnx_file_name", "onnx_sha256", "onnx_status"])


def _matches(path: Path, sha256: str) -> bool:
    return path.is_file() and file_sha256(path) == sha256
