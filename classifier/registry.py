"""Model cards (JSON beside each model file) and registering them as ClassifierModel rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from django.conf import settings

from wbc_ml.checksums import file_sha256
from wbc_ml.onnx_export import export_onnx, onnx_file_name
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
        "ood_file_name": ood.get("file", "") if (card_path.parent / ood.get("file", "-")).is_file() else "",
        "parameters": card.get("parameters"),
        "test_accuracy": test_metrics.get("accuracy"),
        "card": card,
        "is_bundled": True,
        "laboratory": None,
    }
    record, created = ClassifierModel.objects.update_or_create(
        name=card["name"], version=str(card.get("version", "1")), defaults=defaults
    )
    if convert_onnx:
        ensure_onnx(record)
    return record, created


def bundled_cards(models_dir: Path) -> list[Path]:
    return sorted(p for p in Path(models_dir).glob("*.json") if not p.name.startswith("."))


def ensure_onnx(record) -> None:
    """Give a ClassifierModel record its checked ONNX copy, or record why it serves with TensorFlow."""
    onnx_name = onnx_file_name(record.sha256)
    onnx_path = Path(settings.WBC_ONNX_DIR) / onnx_name
    if record.onnx_file_name == onnx_name and onnx_path.is_file():
        return
    try:
        difference = export_onnx(record.path, onnx_path, record.input_size, record.normalization)
    except Exception as exc:  # any failure means: serve with TensorFlow, and say why
        record.onnx_file_name = ""
        record.onnx_status = f"TensorFlow fallback: {exc}"[:500]
        logger.warning("%s: ONNX export not used (%s); serving with TensorFlow", record, exc)
    else:
        record.onnx_file_name = onnx_name
        record.onnx_status = f"ONNX Runtime (max |Δp| vs TensorFlow on probe batch: {difference:.1e})"
    record.save(update_fields=["onnx_file_name", "onnx_status"])
