"""Registering a lab's own model: validated in a separate process before anything is stored.

The upload (or a model file the platform made for the lab, e.g. an adaptation) is copied into a private temporary
folder, checked there by the vetting child (which also exports the ONNX copy), and only then saved to the storages
(:mod:`classifier.model_files`): the model file and its detector file to ``STORAGES["models"]`` as
``lab<id>/<sha256 prefix>-<random>.<ext>``, its ONNX copy to ``STORAGES["onnx"]`` under the same stem. So two labs
uploading the same file, or files with the same name, never share a file, and a failed registration removes only
its own files. The web process never loads the upload: the ONNX copy is required (an upload the child could not
export is refused, nothing stored); saliency maps are made in a sandboxed child too (:mod:`wbc_ml.saliency_child`).
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

from . import model_files
from .models import ClassifierModel

EXTENSIONS = {"keras": ".keras", "h5": ".h5"}


def register_custom_model(
    user, uploaded_file, *, name: str, class_names: list[str], normalization: dict
) -> ClassifierModel:
    """Validate the upload (size, real format, safe layers, shapes, a probe prediction) and register it.

    Raises :class:`ModelRejected` with the reason; on any failure nothing is kept.
    """
    if uploaded_file.size and uploaded_file.size > settings.WBC_MAX_MODEL_BYTES:
        raise ModelRejected(
            f"The file is {uploaded_file.size / 2**20:.0f} MB, over the "
            f"{settings.WBC_MAX_MODEL_BYTES / 2**20:.0f} MB limit for model files."
        )
    with tempfile.TemporaryDirectory(prefix="wbc-model-upload-") as workdir:
        incoming = Path(workdir) / "upload"
        with open(incoming, "wb") as handle:
            for chunk in uploaded_file.chunks():
                handle.write(chunk)
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
    the vetting child, which makes its ONNX copy, and stored under its own name, with its detector file beside it.

    Raises :class:`ModelRejected`; on any failure nothing is kept (``source`` itself is left alone).
    """
    with tempfile.TemporaryDirectory(prefix="wbc-model-upload-") as workdir:
        incoming = Path(workdir) / "upload"
        shutil.copyfile(source, incoming)
        detector = None
        if ood_source is not None:  # copied too: the bytes checksummed are the bytes stored
            detector = Path(workdir) / "detector.ood.npz"
            shutil.copyfile(ood_source, detector)
        return _register_incoming(
            user, incoming, name=name, class_names=class_names, normalization=normalization, card=card,
            temperature=temperature, ood_source=detector, architecture=architecture,
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
    """Vet ``incoming`` (a file in a private temporary folder), then store it, its ONNX copy (and detector file)
    under their own names and save the row; on any failure every stored file of this registration is removed."""
    sha256 = file_sha256(incoming)
    if ClassifierModel.objects.filter(sha256=sha256, laboratory=user.laboratory).exists():
        raise ModelRejected("This exact model file is already registered for your laboratory.")
    exported = incoming.parent / "export" / "model.onnx"
    validated = validate_model_file(
        incoming,
        expected_classes=len(class_names),
        max_bytes=settings.WBC_MAX_MODEL_BYTES,
        onnx_path=exported,
        normalization=normalization,
    )
    if not validated.onnx_sha256:
        raise ModelRejected(onnx_required_message(validated.onnx_status))
    stem = f"lab{user.laboratory_id}/{sha256[:32]}-{secrets.token_hex(4)}"
    record = ClassifierModel(
        name=name,
        architecture=architecture or f"custom ({validated.format})",
        sha256=validated.sha256,
        input_height=validated.input_size[0],
        input_width=validated.input_size[1],
        normalization=normalization,
        class_names=class_names,
        temperature=temperature,
        ood_sha256=file_sha256(ood_source) if ood_source is not None else "",
        parameters=validated.parameters,
        onnx_sha256=validated.onnx_sha256,
        onnx_status=validated.onnx_status[:500],
        card={**card, "format": validated.format},
        is_bundled=False,
        laboratory_id=user.laboratory_id,
        uploaded_by=user,
    )
    files = [
        ("file_name", model_files.MODELS, f"{stem}{EXTENSIONS[validated.format]}", incoming),
        ("onnx_file_name", model_files.ONNX, onnx_file_name(stem), exported),
    ]
    if ood_source is not None:
        files.append(("ood_file_name", model_files.MODELS, f"{stem}.ood.npz", ood_source))
    _store_and_save(record, files)
    return record


def _store_and_save(record: ClassifierModel, files: list[tuple[str, str, str, Path]]) -> None:
    """Put the checked files into their storages (``(field, storage alias, name, local file)``), then save the row;
    on any failure, this registration's stored files go."""
    placed: list[tuple[str, str]] = []
    try:
        for field, alias, name, source in files:
            setattr(record, field, model_files.store(alias, name, source))
            placed.append((alias, getattr(record, field)))
        _save_with_next_version(record)
    except BaseException as exc:
        for alias, name in placed:
            model_files.delete_stored(alias, name)
        if isinstance(exc, ModelRejected) or not isinstance(exc, Exception):
            raise
        raise ModelRejected(
            f"The model passed its checks but could not be stored ({type(exc).__name__}: {exc}); nothing was kept. "
            "Please upload it again in a moment."
        ) from exc


def remove_files(record: ClassifierModel) -> None:
    """Delete a lab model's own stored files (model, ONNX copy, detectors): for a registration undone before use."""
    if record.is_bundled:
        raise ValueError(f"{record} is a bundled model: its files are shared")
    for alias, name in (
        (model_files.MODELS, record.file_name),
        (model_files.ONNX, record.onnx_file_name),
        (model_files.MODELS, record.ood_file_name),
    ):
        if name:
            model_files.delete_stored(alias, name)


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
