"""Turning what a user sent (files, .zip archives) into named byte strings, with limits.

Zip archives are read entry by entry from the uploaded file (a big upload is a temporary file on disk: it is
never read into memory whole) and never extracted to disk: nested folders are flattened into
"folder/name.jpg", hidden and macOS resource files are skipped, entries whose path climbs out of the archive
("..", absolute paths) become failed entries with their reason, and zip bombs are refused by the declared
sizes, the compression ratio and the bytes actually read.
"""

from __future__ import annotations

import contextlib
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from wbc_ml.datasets import IMAGE_SUFFIXES
from wbc_ml.preprocessing import ZIP_SIGNATURE


@dataclass(frozen=True)
class NamedBytes:
    name: str
    data: bytes | None  # None when refused before decoding
    error: str = ""


class UploadRefused(ValueError):
    """The whole submission is refused (too many files, too large); the message says which limit."""


@dataclass(frozen=True)
class Limits:
    max_files: int
    max_total_bytes: int
    max_file_bytes: int
    max_zip_ratio: int = 100


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB"


def expand_uploads(files: list, limits: Limits) -> list[NamedBytes]:
    """Read uploaded files; expand .zip archives. Raises UploadRefused when a batch limit is exceeded."""
    entries: list[NamedBytes] = []
    for uploaded in files:
        name = uploaded.name or "file"
        size = uploaded.size or 0
        if size > limits.max_total_bytes:
            raise UploadRefused(f"{name} is larger than the batch limit of {_mb(limits.max_total_bytes)}.")
        head = uploaded.read(4)
        uploaded.seek(0)
        if head.startswith(ZIP_SIGNATURE) or name.lower().endswith(".zip"):
            with _archive_file(uploaded) as archive_file:
                entries.extend(_expand_zip(name, archive_file, limits))
        elif size > limits.max_file_bytes:
            entries.append(NamedBytes(name, None, f"{name}: the file is larger than {_mb(limits.max_file_bytes)}."))
        else:
            entries.append(NamedBytes(name, uploaded.read(limits.max_file_bytes + 1)))
        if len(entries) > limits.max_files:
            raise UploadRefused(f"Too many images: at most {limits.max_files} per batch.")
    total = sum(len(e.data or b"") for e in entries)
    if total > limits.max_total_bytes:
        raise UploadRefused(f"The batch is larger than {_mb(limits.max_total_bytes)} in all.")
    return entries


@contextlib.contextmanager
def _archive_file(uploaded):
    """The upload as a seekable binary file: its temporary file on disk when Django made one (big uploads), else
    the upload itself (small ones are in memory already)."""
    if hasattr(uploaded, "temporary_file_path"):
        with open(uploaded.temporary_file_path(), "rb") as handle:
            yield handle
    else:
        uploaded.seek(0)
        yield uploaded


def _outside_archive(filename: str) -> bool:
    """An entry named with a parent folder ("..") or an absolute path (/x, C:\\x, \\\\server\\x)."""
    path = filename.replace("\\", "/")
    return path.startswith("/") or (len(path) > 1 and path[1] == ":") or ".." in PurePosixPath(path).parts


def _expand_zip(archive_name: str, source: BinaryIO, limits: Limits) -> list[NamedBytes]:
    try:
        archive = zipfile.ZipFile(source)
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        return [NamedBytes(archive_name, None, f"{archive_name}: not a readable zip archive ({exc}).")]
    results: list[NamedBytes] = []
    declared = sum(m.file_size for m in members)
    if declared > limits.max_total_bytes:
        raise UploadRefused(
            f"{archive_name}: refused as a possible zip bomb: it would expand to {_mb(declared)} "
            f"(the batch limit is {_mb(limits.max_total_bytes)})."
        )
    expanded = 0
    for member in members:
        path = PurePosixPath(member.filename)
        if _outside_archive(member.filename):
            name = f"{archive_name}/{member.filename}"
            results.append(
                NamedBytes(
                    name,
                    None,
                    f"{name}: the path points outside the archive (“..” or an absolute "
                    "path); such entries are not read.",
                )
            )
            continue
        if any(part.startswith(".") or part == "__MACOSX" for part in path.parts):
            continue
        name = f"{archive_name}/{member.filename}"
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            results.append(NamedBytes(name, None, f"{name}: not an image file (only .jpg, .jpeg and .png are read)."))
            continue
        if member.compress_size and member.file_size / member.compress_size > limits.max_zip_ratio:
            raise UploadRefused(
                f"{archive_name}: refused as a possible zip bomb ({member.filename} expands "
                f"{member.file_size // max(member.compress_size, 1)}-fold)."
            )
        if member.flag_bits & 0x1:
            results.append(NamedBytes(name, None, f"{name}: encrypted zip entries cannot be read."))
            continue
        if member.file_size > limits.max_file_bytes:
            results.append(NamedBytes(name, None, f"{name}: the file is larger than {_mb(limits.max_file_bytes)}."))
            continue
        try:
            with archive.open(member) as handle:
                content = handle.read(limits.max_file_bytes + 1)  # never trust the declared size alone
        except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as exc:
            results.append(NamedBytes(name, None, f"{name}: could not be read from the archive ({exc})."))
            continue
        if len(content) > limits.max_file_bytes:
            results.append(NamedBytes(name, None, f"{name}: the file is larger than {_mb(limits.max_file_bytes)}."))
            continue
        expanded += len(content)
        if expanded > limits.max_total_bytes:
            raise UploadRefused(f"{archive_name}: refused: it expands beyond {_mb(limits.max_total_bytes)}.")
        results.append(NamedBytes(name, content))
        if len(results) > limits.max_files:
            raise UploadRefused(f"Too many images: at most {limits.max_files} per batch.")
    return results
