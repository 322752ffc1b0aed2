"""Training the bundled models.

Three architectures share one split, one preprocessing path and one model-card format:

* ``enhanced_cnn_v2``: a small CNN trained from scratch, end to end with on-the-fly augmentation and
  outlier exposure (non-WBC cells with a uniform target).
* ``mobilenet_v2_head``: ImageNet MobileNetV2 frozen; a dropout + softmax head on top.
* ``mobilenet_v2_finetuned``: the same, then the last block (``block_16`` and ``Conv_1``) unfrozen
  except its BatchNormalization layers.

On a 2-core CPU the MobileNetV2 models are trained on cached activations: the frozen part of the
backbone (everything up to ``block_15_add``) is run once over several augmented copies of every
training image, and only the layers that can change are trained on that cache. With frozen
BatchNormalization this is mathematically the same network as end-to-end training, at a fraction of
the cost. The saved model is always the whole network, evaluated end to end on the test split.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .augmentation import augment_batch
from .cnn import OUTLIER_REPEATS, OUTLIER_WEIGHT, recalibrate_batchnorm, with_outlier_exposure
from .common import Log, class_weights, features_and_probs, predict_in_batches
from .config import ARCHITECTURES, TrainConfig
from .detectors import evaluate_ood, features_of_paths, fit_detectors, non_wbc_parts, ood_card
from .pipeline import train

__all__ = [
    "ARCHITECTURES",
    "OUTLIER_REPEATS",
    "OUTLIER_WEIGHT",
    "Log",
    "TrainConfig",
    "augment_batch",
    "class_weights",
    "evaluate_ood",
    "features_and_probs",
    "features_of_paths",
    "fit_detectors",
    "non_wbc_parts",
    "ood_card",
    "predict_in_batches",
    "recalibrate_batchnorm",
    "train",
    "with_outlier_exposure",
]
