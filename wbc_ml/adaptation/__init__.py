"""Adapting a trained classifier to a laboratory's own microscope with a few of its labelled cells (no Django).

``choose_cells`` picks the adaptation cells, :class:`Adaptation` computes and cross-validates the candidates
(BatchNormalization re-estimation, a new head, fine-tuning the last block), and ``adapt_model`` writes the
adapted model, its card and its detectors. See ``pipeline`` for the methods.

The names are loaded on first use: the web process imports the TensorFlow-free parts (``cells``, ``progress``)
without loading TensorFlow, which only the worker and the commands need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "MIN_CELLS_PER_CLASS": ".cells",
    "AdaptationRefused": ".cells",
    "check_counts": ".cells",
    "choose_cells": ".cells",
    "unseen": ".cells",
    "adapt_model": ".output",
    "METHODS": ".pipeline",
    "Adaptation": ".pipeline",
    "AdaptConfig": ".pipeline",
    "Adapted": ".pipeline",
    "Candidate": ".pipeline",
    "choose": ".pipeline",
    "Cancelled": ".progress",
    "Progress": ".progress",
}

__all__ = [
    "METHODS",
    "MIN_CELLS_PER_CLASS",
    "AdaptConfig",
    "Adaptation",
    "AdaptationRefused",
    "Adapted",
    "Cancelled",
    "Candidate",
    "Progress",
    "adapt_model",
    "check_counts",
    "choose",
    "choose_cells",
    "unseen",
]

if TYPE_CHECKING:
    from .cells import MIN_CELLS_PER_CLASS, AdaptationRefused, check_counts, choose_cells, unseen
    from .output import adapt_model
    from .pipeline import METHODS, Adaptation, AdaptConfig, Adapted, Candidate, choose
    from .progress import Cancelled, Progress


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
