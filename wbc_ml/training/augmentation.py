"""Augmentation on uint8 pixels (numpy), before the shared normalisation.

Two strengths: ``augment_batch`` (dihedral views, mild colour jitter) and ``travel_batch``, which adds what differs
between laboratories: stain (HED jitter, Tellez et al. 2018), gamma, contrast, focus (blur), magnification (scale
0.6-1.4) and camera compression (JPEG quality).
"""

from __future__ import annotations

import io

import keras
import numpy as np
from PIL import Image, ImageFilter

# Ruifrok & Johnston (2001) haematoxylin, eosin and DAB optical-density vectors (rows), as in scikit-image.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RGB_FROM_HED /= np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

AUGMENTATIONS = {
    "mild": "random flips, 90-degree rotations, contrast/brightness and per-channel stain jitter",
    "travel": (
        "random flips, 90-degree rotations, contrast/brightness and per-channel stain jitter, then HED stain jitter "
        "(scale 0.9-1.1, shift +-0.05 per channel), gamma 0.7-1.4, Gaussian blur (sigma up to 1.5, half of the "
        "images), scale 0.6-1.4 and JPEG quality 30-95 (half of the images)"
    ),
}


def augment_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smear-friendly augmentation: dihedral flips/rotations and mild stain/brightness jitter."""
    out = np.empty(images.shape, dtype=np.float32)
    square = images.shape[1] == images.shape[2]
    for i, image in enumerate(images):
        x = image.astype(np.float32)
        if rng.random() < 0.5:
            x = x[:, ::-1]
        if rng.random() < 0.5:
            x = x[::-1]
        if square:
            x = np.rot90(x, k=int(rng.integers(4)))
        out[i] = jitter_colours(x, rng)
    return out


def travel_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``augment_batch`` plus another laboratory's stain, focus, magnification and camera."""
    return np.stack([travel_image(image, rng) for image in augment_batch(images, rng)])


def travel_image(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One float32 image (0-255) as another microscope might have taken it."""
    x = jitter_hed(image, rng)
    x = 255.0 * (x / 255.0) ** rng.uniform(0.7, 1.4)
    picture = Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    picture = rescale(picture, rng.uniform(0.6, 1.4))
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=int(rng.integers(30, 96)))
        picture = Image.open(buffer)
    return np.asarray(picture.convert("RGB"), dtype=np.float32)


def jitter_hed(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale and shift each stain's optical density (haematoxylin, eosin, residual)."""
    density = -np.log(np.clip(image.astype(np.float64), 1.0, 255.0) / 255.0) @ HED_FROM_RGB
    density = density * rng.uniform(0.9, 1.1, size=3) + rng.uniform(-0.05, 0.05, size=3)
    return np.clip(255.0 * np.exp(-(density @ RGB_FROM_HED)), 0.0, 255.0).astype(np.float32)


def rescale(picture: Image.Image, factor: float) -> Image.Image:
    """The cell magnified by ``factor`` about the centre, at the same pixel size (edges mirrored when shrunk)."""
    width, height = picture.size
    scaled = picture.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.BILINEAR)
    pixels = np.asarray(scaled)
    if factor < 1:
        pad_y, pad_x = max(0, height - pixels.shape[0]), max(0, width - pixels.shape[1])
        pixels = np.pad(
            pixels, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)), mode="reflect"
        )
    top, left = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
    return Image.fromarray(np.ascontiguousarray(pixels[top : top + height, left : left + width]))


def jitter_colours(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One image (float32 or uint8 pixels) with mild random contrast, brightness and per-channel stain gain."""
    x = image.astype(np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.85, 1.15) + mean  # contrast
    x = x * rng.uniform(0.9, 1.1)  # brightness
    x = x * rng.uniform(0.93, 1.07, size=3).astype(np.float32)  # per-channel stain gain
    return np.clip(x, 0.0, 255.0)


AUGMENT = {"mild": augment_batch, "travel": travel_batch}


class AugmentedBatches(keras.utils.PyDataset):
    def __init__(self, x, y_onehot, weights, batch_size, normalization, seed, augmentation="mild"):
        super().__init__()
        self.x, self.y, self.w = x, y_onehot, weights
        self.batch_size = batch_size
        self.normalization = normalization
        self.augment = AUGMENT[augmentation]
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self) -> int:
        return int(np.ceil(len(self.x) / self.batch_size))

    def __getitem__(self, index):
        idx = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        batch = self.normalization.apply(self.augment(self.x[idx], self.rng))
        return batch, self.y[idx], self.w[idx]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.x))
