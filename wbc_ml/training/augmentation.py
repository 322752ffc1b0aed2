"""Augmentation on uint8 pixels (numpy), before the shared normalisation."""

from __future__ import annotations

import keras
import numpy as np


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


def jitter_colours(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One image (float32 or uint8 pixels) with mild random contrast, brightness and per-channel stain gain."""
    x = image.astype(np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.85, 1.15) + mean  # contrast
    x = x * rng.uniform(0.9, 1.1)  # brightness
    x = x * rng.uniform(0.93, 1.07, size=3).astype(np.float32)  # per-channel stain gain
    return np.clip(x, 0.0, 255.0)


class AugmentedBatches(keras.utils.PyDataset):
    def __init__(self, x, y_onehot, weights, batch_size, normalization, seed):
        super().__init__()
        self.x, self.y, self.w = x, y_onehot, weights
        self.batch_size = batch_size
        self.normalization = normalization
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self) -> int:
        return int(np.ceil(len(self.x) / self.batch_size))

    def __getitem__(self, index):
        idx = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        batch = self.normalization.apply(augment_batch(self.x[idx], self.rng))
        return batch, self.y[idx], self.w[idx]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.x))
