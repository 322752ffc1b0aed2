"""Pure pixel functions shared by training and serving.

No Django and no TensorFlow here: decoding, orientation, resizing and normalisation are plain
Pillow/numpy so that the exact same code prepares training data and live uploads (a mismatch
between the two is how the prototype's MobileNetV2 fell to 31%).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = {"JPEG": "JPEG", "PNG": "PNG"}
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 16


class ImageRejected(ValueError):
    """An upload that cannot be classified; the message is shown to the user as is."""


MEAN_RANGE = (-255.0, 510.0)  # z-score limits for 0–255 pixels
STD_RANGE = (1e-3, 1000.0)


@dataclass(frozen=True)
class Normalization:
    """How 0–255 RGB pixels become model input: ``scale01`` (x / 255) or per-channel ``zscore``."""

    method: str
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def from_dict(cls, spec: dict) -> Normalization:
        method = spec.get("method")
        if method == "scale01":
            return cls("scale01")
        if method == "zscore":
            mean, std = spec.get("mean"), spec.get("std")
            if not (_is_rgb_triplet(mean) and _is_rgb_triplet(std)):
                raise ValueError("zscore normalisation needs 'mean' and 'std', three finite numbers each")
            return cls("zscore", tuple(float(v) for v in mean), tuple(float(v) for v in std)).validate()
        raise ValueError(f"unknown normalisation method {method!r} (expected 'scale01' or 'zscore')")

    def validate(self) -> Normalization:
        """Itself, when its numbers keep 0–255 pixels finite and meaningful; else ValueError saying which is off.

        The one rule for every override (page forms, API, model upload): finite values, each mean within
        MEAN_RANGE and each std within STD_RANGE (a std near 0 turns pixels into infinities).
        """
        if self.method == "zscore":
            for label, values, (low, high) in (("mean", self.mean, MEAN_RANGE), ("std", self.std, STD_RANGE)):
                if not all(math.isfinite(v) and low <= v <= high for v in values):
                    shown = ", ".join(f"{v:g}" for v in values)
                    raise ValueError(
                        f"zscore normalisation: each '{label}' value must be between {low:g} and {high:g} "
                        f"(got {shown})."
                    )
        return self

    def to_dict(self) -> dict:
        if self.method == "scale01":
            return {"method": "scale01"}
        return {"method": "zscore", "mean": list(self.mean), "std": list(self.std)}

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Map uint8 (or float 0–255) pixels, channels last, to float32 model input."""
        x = np.array(pixels, dtype=np.float32)  # a copy, normalised in place (no temporaries: memory-bound)
        if self.method == "scale01":
            x /= np.float32(255.0)
            return x
        x -= np.asarray(self.mean, dtype=np.float32)
        x /= np.asarray(self.std, dtype=np.float32)
        return x


IMAGE_SIGNATURES = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n"}
FILE_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png"}
ZIP_SIGNATURE = b"PK\x03\x04"


def sniff_image_type(data: bytes) -> str | None:
    """'JPEG' or 'PNG' by the first bytes, else None (whatever the name or the declared content type says)."""
    return next((fmt for fmt, magic in IMAGE_SIGNATURES.items() if data.startswith(magic)), None)


def _is_rgb_triplet(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and len(value) == 3
        and all(isinstance(v, int | float) and np.isfinite(v) for v in value)
    )


def open_image(
    source: bytes | BinaryIO,
    *,
    name: str = "image",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Open a JPEG/PNG without decoding its pixels, with every refusal that needs none.

    Empty, too many bytes, not a JPEG or PNG (by what Pillow reads, never by the file name), too many pixels (a
    decompression bomb), too small: each raises :class:`ImageRejected` with a sentence that names the file and the
    reason. A damaged or truncated pixel stream is found only by decoding it (:func:`decode_image`). Batches check
    their uploads with this alone, because the worker decodes every image anyway and fails a damaged one with
    its reason.
    """
    data = source if isinstance(source, bytes) else source.read(max_bytes + 1)
    if not data:
        raise ImageRejected(f"{name}: the file is empty.")
    if len(data) > max_bytes:
        raise ImageRejected(f"{name}: the file is larger than {max_bytes // (1024 * 1024)} MB.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(
            f"{name}: refused as a possible decompression bomb (too many pixels to decode safely)."
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(f"{name}: not a readable image; upload a JPEG or PNG.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise _damaged(name, exc) from exc
    fmt = image.format
    if fmt not in ALLOWED_FORMATS:
        raise ImageRejected(f"{name}: unsupported image type ({fmt or 'unknown'}); upload a JPEG or PNG.")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            f"{name}: the image is too large ({width}x{height} pixels; "
            f"the limit is {max_pixels // 1_000_000} megapixels)."
        )
    if min(width, height) < DEFAULT_MIN_SIDE:
        raise ImageRejected(f"{name}: the image is too small ({width}x{height} pixels).")
    return image


def _damaged(name: str, error: Exception) -> ImageRejected:
    return ImageRejected(f"{name}: the image is damaged or truncated ({error}).")


def decode_image(
    source: bytes | BinaryIO,
    *,
    name: str = "image",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduced: bool = False,
) -> Image.Image:
    """Decode a JPEG/PNG fully, honour EXIF orientation and return an RGB image.

    The refusals of :func:`open_image`, and a damaged or truncated pixel stream, raise :class:`ImageRejected`.
    ``reduced=True`` (for checking a file that is used later, e.g. an adaptation upload) decodes a JPEG's whole
    stream at 1/8 scale: the same refusals (truncation included) at about half the cost, but the returned image is
    small.
    """
    image = open_image(source, name=name, max_bytes=max_bytes, max_pixels=max_pixels)
    width, height = image.size
    try:
        if reduced and image.format == "JPEG":
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise _damaged(name, exc) from exc
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of every upright image
    if image.mode != "RGB":
        image = _to_rgb(image)
    return image


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")  # a 16-bit grayscale PNG opens as one of these


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white (a slide background) and drop other modes to RGB.

    16-bit grayscale is scaled to 8 bits (0-65535 onto 0-255, i.e. divided by 257 and rounded): Pillow's own
    conversion clips every value above 255 and turns the image white.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        gray = np.rint(levels / 257).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def resize(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to (height, width) with bilinear filtering; returns uint8 HxWx3."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_pixels(source: bytes | BinaryIO, size: tuple[int, int], *, name: str = "image", **limits: int) -> np.ndarray:
    """Decode, orient, convert and resize in one step (uint8 HxWx3)."""
    return resize(decode_image(source, name=name, **limits), size)


def load_path(path: str, size: tuple[int, int]) -> np.ndarray:
    """Read an image file from disk and prepare it like an upload (used by training/evaluation)."""
    with open(path, "rb") as handle:
        return load_pixels(handle.read(), size, name=str(path))
