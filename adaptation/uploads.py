"""A .zip of labelled cells (one folder per class), checked like a batch upload and stored for one job.

The archive is read by :func:`reports.uploads.expand_uploads` (zip bombs, paths out of the archive, encrypted and
oversized entries) and every image is decoded as an upload is (the type from its content, never its name).
Training data must be what the lab meant: any bad entry refuses the whole archive, with the reasons, and nothing
is stored; otherwise every image is stored before the job exists, and removed again if creating it fails.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from reports.submission import batch_limits, checked_upload
from reports.uploads import UploadRefused, expand_uploads
from wbc_ml.preprocessing import sniff_image_type

from .cells import UPLOAD, LabelledCell

MAX_PROBLEMS_SHOWN = 10


def _class_of(name: str, class_names: list[str]) -> str | None:
    """The class folder an entry sits in (its parent folder, any case), or None."""
    parts = PurePosixPath(name).parts
    folder = parts[-2].strip().lower() if len(parts) >= 3 else ""  # parts[0] is the archive's own name
    return folder if folder in class_names else None


def _problem_text(problems: list[str]) -> str:
    shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = f"; and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
    return f"The .zip was not used ({len(problems)} problem(s)); nothing was stored: {shown}{more}."


def checked_entries(uploaded, class_names: list[str]) -> list[tuple[str, str, bytes]]:
    """(class, entry name, bytes) of every image of the archive; raises :class:`UploadRefused` with every problem."""
    entries = expand_uploads([uploaded], batch_limits())
    problems, accepted = [], []
    for entry in (checked_upload(e, decode=True) for e in entries):  # decoded: training reads them later
        if entry.error or entry.data is None:
            problems.append(entry.error or f"{entry.name}: not read")
            continue
        class_name = _class_of(entry.name, class_names)
        if class_name is None:
            problems.append(f"{entry.name}: not in a folder named after a class ({', '.join(class_names)})")
            continue
        accepted.append((class_name, entry.name, entry.data))
    if problems:
        raise UploadRefused(_problem_text(problems))
    if not accepted:
        raise UploadRefused("The .zip holds no images: put the cells in one folder per class (e.g. basophil/…).")
    return accepted


def store_zip(uploaded, class_names: list[str], folder: str) -> list[LabelledCell]:
    """Check the archive, then store its images under ``folder``; on any failure nothing is left stored."""
    accepted = checked_entries(uploaded, class_names)
    stored: list[str] = []
    try:
        cells = []
        for number, (class_name, entry_name, data) in enumerate(accepted):
            suffix = ".png" if sniff_image_type(data) == "PNG" else ".jpg"
            image = default_storage.save(f"{folder}/{class_name}/{number:05d}{suffix}", ContentFile(data))
            stored.append(image)
            cells.append(LabelledCell(image, class_name, UPLOAD, f"zip{number}-{PurePosixPath(entry_name).name}"))
    except BaseException:
        remove_stored(stored)
        raise
    return cells


def remove_stored(images: list[str]) -> None:
    for image in images:
        default_storage.delete(image)
