"""Registering a lab's own model: validated in a separate process before anything is stored.

Every upload gets its own content-addressed path, ``lab<id>/<sha256 prefix>-<random>.<ext>`` in
``WBC_CUSTOM_MODELS_DIR`` (its ONNX copy the same stem in ``WBC_ONNX_DIR``), so two labs uploading the same
file, or files with the same name, never share a file, and a failed registration removes only its own files.
The web process never loads the upload: the vetting child checks it and exports the ONNX copy, which is
required (an upload the child could not export is refused, nothing stored); saliency maps are made in a sandboxed
child too (:mod:`wbc_ml.saliency_child`).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction

from wbc_ml.checksums import file_sha256
from wbc_ml.onnx_export import onnx_file_name
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
    card = {"uploaded_file": uploaded_file.name, "validated": True}
    return _register_incoming(
        user, incoming, name=name, class_names=class_names, normalization=normalization, card=card
    )


def register_lab_model_file(
    user,
    source: Path,
    *,
    name: str,
    class_names: list[str],
    normalization: dict,
    temperature: float,
    card: dict,
    ood_source: Path | None,
    architecture: str,
) -> ClassifierModel:
    """Register a model file the platform made for ``user``'s lab (an adaptation) exactly like an upload: checked by
    the vetting child, which makes its ONNX copy, and stored under its own path, with its detector file beside it.

    Raises :class:`ModelRejected`; on any failure nothing is kept (``source`` itself is left alone).
    """
    folder = Path(settings.WBC_CUSTOM_MODELS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".incoming-", delete=False) as handle:
        incoming = Path(handle.name)
    shutil.copyfile(source, incoming)
    return _register_incoming(
        user, incoming, name=name, class_names=class_names, normalization=normalization, card=card,
        temperature=temperature, ood_source=ood_source, architecture=architecture,
    )  # fmt: skip


def _register_incoming(
    user,
    incoming: Path,
    *,
    name: str,
    class_names: list[str],
    normalization: dict,
    card: dict,
    temperature: float = 1.0,
    ood_source: Path | None = None,
    architecture: str = "",
) -> ClassifierModel:
    """Vet ``incoming`` (a file in the custom models folder), move it and its ONNX copy (and detector file) to their
    own paths and save the row; on any failure every file of this registration is removed."""
    folder = Path(settings.WBC_CUSTOM_MODELS_DIR)
    placed: list[Path] = [incoming]  # this registration's own files, removed on any failure
    try:
        sha256 = file_sha256(incoming)
        if ClassifierModel.objects.filter(sha256=sha256, laboratory=user.laboratory).exists():
            raise ModelRejected("This exact model file is already registered for your laboratory.")
        stem = f"lab{user.laboratory_id}/{sha256[:32]}-{secrets.token_hex(4)}"
        onnx_path = Path(settings.WBC_ONNX_DIR) / onnx_file_name(stem)
        placed.append(onnx_path)
        validated = validate_model_file(
            incoming,
            expected_classes=len(class_names),
            max_bytes=settings.WBC_MAX_MODEL_BYTES,
            onnx_path=onnx_path,
            normalization=normalization,
        )
        if not validated.onnx_sha256:
            raise ModelRejected(onnx_required_message(validated.onnx_status))
        file_name = f"{stem}{EXTENSIONS[validated.format]}"
        final = folder / file_name
        final.parent.mkdir(parents=True, exist_ok=True)
        placed.append(final)
        shutil.move(incoming, final)
        ood_name = f"{stem}.ood.npz" if ood_source is not None else ""
        if ood_source is not None:
            placed.append(folder / ood_name)
            shutil.copyfile(ood_source, folder / ood_name)
        record = ClassifierModel(
            name=name,
            architecture=architecture or f"custom ({validated.format})",
            file_name=file_name,
            sha256=validated.sha256,
            input_height=validated.input_size[0],
            input_width=validated.input_size[1],
            normalization=normalization,
            class_names=class_names,
            temperature=temperature,
            ood_file_name=ood_name,
            ood_sha256=file_sha256(folder / ood_name) if ood_name else "",
            parameters=validated.parameters,
            onnx_file_name=onnx_file_name(stem),
            onnx_sha256=validated.onnx_sha256,
            onnx_status=validated.onnx_status[:500],
            card={**card, "format": validated.format},
            is_bundled=False,
            laboratory_id=user.laboratory_id,
            uploaded_by=user,
        )
        _save_with_next_version(record)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    return record


def remove_files(record: ClassifierModel) -> None:
    """Delete a lab model's own files (model, ONNX copy, detectors): for a registration undone before use."""
    if record.is_bundled:
        raise ValueError(f"{record} is a bundled model: its files are shared")
    for path in (record.path, *(p for p in (record.spec().onnx_path, record.spec().ood_path) if p is not None)):
        path.unlink(missing_ok=True)


def onnx_required_message(onnx_status: str) -> str:
    """Why an upload whose ONNX export failed is refused (``onnx_status``: the vetting child's words)."""
    reason = onnx_status.removeprefix("TensorFlow fallback:").strip() or "no reason given"
    return (
        f"The model could not be converted to ONNX for serving ({reason}). Uploaded models are only served "
        "through a checked ONNX copy, so it was not stored; use layers the ONNX converter supports and upload it "
        "again."
    )


def _save_with_next_version(record: ClassifierModel) -> None:
    try:
        with transaction.atomic():
            record.version = _next_version(record.name)
            record.save()
    except IntegrityError as exc:  # another upload took the same name and version at the same moment
        raise ModelRejected(
            f"Another model named {record.name!r} was registered at the same moment; please try again."
        ) from exc


def _next_version(name: str) -> str:
    """One more than the highest numbered version of ``name`` (gaps left by deleted models are never reused)."""
    versions = ClassifierModel.objects.filter(name=name).values_list("version", flat=True)
    return str(max((int(v) for v in versions if v.isdigit()), default=0) + 1)
