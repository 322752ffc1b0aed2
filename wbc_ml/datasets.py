"""Image folders on disk and the deterministic train/validation/test split (no TensorFlow)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .preprocessing import load_path

WBC_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SPLIT_SEED = "wbc-split-v1"
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
SPLIT_RULE = (
    "Per class, files are sorted by sha256('wbc-split-v1:' + file name); the first 70% are train, "
    "the next 15% validation, the last 15% test (stratified, deterministic, independent of file order)."
)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int

    @property
    def name(self) -> str:
        return self.path.name


def list_images(data_dir: str | os.PathLike, class_names: tuple[str, ...] = WBC_CLASSES) -> list[Sample]:
    """All images under ``data_dir/<class>/``; missing class folders are an error."""
    root = Path(data_dir)
    samples: list[Sample] = []
    for label, class_name in enumerate(class_names):
        folder = root / class_name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: expected one folder per class {class_names}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        samples.extend(Sample(p, label) for p in files)
    return samples


def _split_key(name: str) -> str:
    return hashlib.sha256(f"{SPLIT_SEED}:{name}".encode()).hexdigest()


def split_samples(samples: list[Sample]) -> dict[str, list[Sample]]:
    """Stratified, seeded split by a hash rule (see :data:`SPLIT_RULE`)."""
    parts: dict[str, list[Sample]] = {name: [] for name in SPLIT_FRACTIONS}
    labels = sorted({s.label for s in samples})
    for label in labels:
        members = sorted((s for s in samples if s.label == label), key=lambda s: _split_key(s.name))
        n_train = round(len(members) * SPLIT_FRACTIONS["train"])
        n_val = round(len(members) * SPLIT_FRACTIONS["val"])
        parts["train"] += members[:n_train]
        parts["val"] += members[n_train : n_train + n_val]
        parts["test"] += members[n_train + n_val :]
    return parts


def split_digest(samples: list[Sample]) -> str:
    """sha256 over the sorted file names of one split, so a reader can verify a reproduction."""
    names = "\n".join(sorted(s.name for s in samples))
    return hashlib.sha256(names.encode()).hexdigest()


def load_arrays(
    samples: list[Sample], size: tuple[int, int], workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize images in parallel (Pillow releases the GIL while decoding)."""
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = list(pool.map(lambda s: load_path(str(s.path), size), samples))
    x = np.stack(images) if images else np.zeros((0, *size, 3), np.uint8)
    y = np.asarray([s.label for s in samples], dtype=np.int64)
    return x, y
