"""The model card: everything a reader needs to know about a trained model, as JSON beside it."""

from __future__ import annotations

import os
import platform

import keras
import numpy as np
import tensorflow as tf


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def hardware() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.platform()})"


def display_name(arch: str) -> str:
    return {
        "enhanced_cnn_v2": "Enhanced CNNv2",
        "mobilenet_v2_head": "MobileNetV2 (head)",
        "mobilenet_v2_finetuned": "MobileNetV2 (fine-tuned)",
    }[arch]
