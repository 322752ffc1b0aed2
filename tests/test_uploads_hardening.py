"""Uploads that used to be mishandled quietly: 16-bit grayscale PNGs, zip entries that climb out of the archive,
huge archives read into memory, and batches whose every file failed."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile, TemporaryUploadedFile
from django.urls import reverse
from PIL import Image

from reports.models import Batch
from reports.uploads import Limits, expand_uploads
from tests.conftest import image_bytes
from wbc_ml.preprocessing import decode_image

LIMITS = Limits(max_files=100, max_total_bytes=50 * 1024 * 1024, max_file_bytes=5 * 1024 * 1024)


# --- 16-bit grayscale PNG ----------------------------------------------------------------------------------------


def _png16(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # really a 16-bit grayscale file
    return data


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_saturated():
    levels = np.array([[0, 257, 25700, 32896], [40000, 51400, 60000, 65535]] * 8, dtype=np.uint16)  # 16 x 4
    levels = np.tile(levels, (1, 4))  # 16 x 16, the smallest size the decoder accepts
    pixels = np.asarray(decode_image(_png16(levels), name="cell16.png"))
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    expected = np.rint(levels / 257).astype(np.uint8)  # 65535 -> 255, 25700 -> 100, 257 -> 1
    for channel in range(3):
        np.testing.assert_array_equal(pixels[:, :, channel], expected)
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) == 8


def test_a_dark_16_bit_image_keeps_its_contrast():
    """A camera's 12-bit data in a 16-bit PNG: the cell stays darker than the background, nothing turns white."""
    values = np.full((32, 32), 3000, dtype=np.uint16)
    values[8:24, 8:24] = 1200
    pixels = np.asarray(decode_image(_png16(values), name="dark16.png"))
    assert pixels[0, 0, 0] == round(3000 / 257) and pixels[16, 16, 0] == round(1200 / 257)


# --- zip entries that climb out ----------------------------------------------------------------------------------


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("bad_name", ["../escape.png", "a/../../escape.png", "/etc/cell.png", "cells/../../x.png"])
def test_zip_entries_with_dot_dot_or_absolute_paths_are_listed_as_failed(bad_name):
    archive = _zip({"good.png": image_bytes(), bad_name: image_bytes()})
    entries = expand_uploads([SimpleUploadedFile("slide.zip", archive)], LIMITS)
    by_name = {entry.name: entry for entry in entries}
    assert by_name["slide.zip/good.png"].data is not None
    bad = by_name[f"slide.zip/{bad_name}"]
    assert bad.data is None and "outside the archive" in bad.error


def test_dot_dot_inside_a_name_is_not_a_parent_folder():
    entries = expand_uploads([SimpleUploadedFile("s.zip", _zip({"cells/a..b.png": image_bytes()}))], LIMITS)
    assert [(e.name, e.error) for e in entries] == [("s.zip/cells/a..b.png", "")]


# --- big archives are streamed from their temporary file -----------------------------------------------------------


class _NoWholeRead(TemporaryUploadedFile):
    """A real temporary upload (a file on disk, as Django makes for big uploads) that fails on a whole-file read."""

    def read(self, size=-1):
        if size is None or size < 0:
            raise AssertionError("the whole archive was read into memory")
        return super().read(size)


def _temporary_upload(name: str, data: bytes) -> TemporaryUploadedFile:
    upload = _NoWholeRead(name, "application/zip", len(data), None)
    upload.write(data)
    upload.seek(0)
    return upload


def test_a_large_zip_on_disk_is_expanded_without_reading_it_whole():
    cells = {f"cells/{i:03}.png": image_bytes(color=(200, i, 160)) for i in range(30)}
    upload = _temporary_upload("slide.zip", _zip(cells))
    entries = expand_uploads([upload], LIMITS)
    assert [e.name for e in entries] == [f"slide.zip/{name}" for name in cells]
    assert [e.data for e in entries] == list(cells.values())


def test_zip_bomb_limits_still_hold_when_streamed():
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", b"\0" * (4 * 1024 * 1024))
    upload = _temporary_upload("bomb.zip", bomb.getvalue())
    from reports.uploads import UploadRefused

    with pytest.raises(UploadRefused, match="zip bomb"):
        expand_uploads([upload], LIMITS)


# --- a batch whose every file failed: refused, nothing stored (pages and API alike) ----------------------------------


def test_batch_page_refuses_a_batch_whose_every_file_failed(tech_client, tiny_record):
    files = [SimpleUploadedFile("notes.txt", b"not an image"), SimpleUploadedFile("broken.png", b"\x89PNG broken")]
    response = tech_client.post(
        reverse("reports:batch_new"), {"name": "All bad", "model": tiny_record.pk, "files": files}
    )
    assert response.status_code == 400
    text = response.content.decode()
    assert "None of the files could be used; nothing was stored." in text
    assert "notes.txt" in text and "broken.png" in text
    assert not Batch.objects.exists()
