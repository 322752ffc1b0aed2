"""Registering a lab's own model: validated in a separate process before anything is stored."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import transaction

from wbc_ml.vetting import ModelRejected, validate_model_file

from .models import ClassifierModel

EXTENSIONS = {"keras": ".keras", "h5": ".h5"}


def register_custom_model(
    user, uploaded_file, *, name: str, class_names: list[str], normalization: dict
) -> ClassifierModel:
    """Validate the upload (size, real format, safe layers, shapes, a probe prediction) and register it.

    Raises :class:`ModelRejected` with the reason; on any failure nothing is kept.
    """
    folder = Path(settings.WBC_CUSTOM_MODELS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    if uploaded_file.size and uploaded_file.size > settings.WBC_MAX_MODEL_BYTES:
        raise ModelRejected(
            f"The file is {uploaded_file.size / 2**20:.0f} MB, over the "
            f"{settings.WBC_MAX_MODEL_BYTES / 2**20:.0f} MB limit for model files."
        )
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".incoming-", delete=False) as handle:
        for chunk in uploaded_file.chunks():
            handle.write(chunk)
        incoming = Path(handle.name)
    try:
        validated = validate_model_file(
            incoming, expected_classes=len(class_names), max_bytes=settings.WBC_MAX_MODEL_BYTES
        )
        if ClassifierModel.objects.filter(sha256=validated.sha256, laboratory=user.laboratory).exists():
            raise ModelRejected("This exact model file is already registered for your laboratory.")
        final = folder / f"{validated.sha256[:24]}{EXTENSIONS[validated.format]}"
        shutil.move(incoming, final)
    except BaseException:
        incoming.unlink(missing_ok=True)
        raise
    try:
        with transaction.atomic():
            version = str(ClassifierModel.objects.filter(name=name).count() + 1)
            record = ClassifierModel.objects.create(
                name=name,
                version=version,
                architecture=f"custom ({validated.format})",
                file_name=final.name,
                sha256=validated.sha256,
                input_height=validated.input_size[0],
                input_width=validated.input_size[1],
                normalization=normalization,
                class_names=class_names,
                temperature=1.0,
                parameters=validated.parameters,
                card={"uploaded_file": uploaded_file.name, "format": validated.format, "validated": True},
                is_bundled=False,
                laboratory_id=user.laboratory_id,
                uploaded_by=user,
            )
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    from .registry import ensure_onnx

    ensure_onnx(record)
    return record
