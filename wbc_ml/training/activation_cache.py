"""The frozen MobileNetV2 trunk run once over augmented copies of the training images, cached on disk.

With frozen BatchNormalization, training only the layers after ``block_15_add`` on these activations is the same
network as end-to-end training, at a fraction of the cost on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from ..preprocessing import Normalization
from .augmentation import AUGMENT
from .common import predict_in_batches

IMAGENET_NORMALIZATION = Normalization("zscore", (127.5, 127.5, 127.5), (127.5, 127.5, 127.5))


def mobilenet_activations(config, parts, x_train, y_train, x_val, log):
    """block_15 activations for ``augment_copies`` augmented copies of train and for plain val."""
    key = hashlib.sha256(
        json.dumps(
            [
                config.input_size,
                config.augment_copies,
                config.seed,
                len(x_train),
                config.max_per_class,
                str(config.imagenet_weights),
                config.augmentation,
            ]
        ).encode()
    ).hexdigest()[:16]
    cache_file = config.cache_dir / f"mobilenet_cache_{key}.npz" if config.cache_dir else None
    if cache_file and cache_file.exists():
        log(f"reusing activation cache {cache_file}")
        data = np.load(cache_file)
        return data["train"], data["train_labels"], data["val"]
    rng = np.random.default_rng(config.seed)
    augment = AUGMENT[config.augmentation]
    started = time.time()
    chunks, labels = [], []
    for copy in range(config.augment_copies):
        for start in range(0, len(x_train), 64):
            batch = x_train[start : start + 64]
            pixels = batch.astype(np.float32) if copy == 0 else augment(batch, rng)
            chunks.append(np.asarray(parts.trunk.predict_on_batch(IMAGENET_NORMALIZATION.apply(pixels)), np.float16))
            labels.append(y_train[start : start + 64])
        log(f"cached augmented copy {copy + 1}/{config.augment_copies} ({time.time() - started:.0f}s)")
    train_acts = np.concatenate(chunks)
    train_labels = np.concatenate(labels)
    val_acts = predict_in_batches(parts.trunk, x_val, IMAGENET_NORMALIZATION).astype(np.float16)
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, train=train_acts, train_labels=train_labels, val=val_acts)
    return train_acts, train_labels, val_acts
