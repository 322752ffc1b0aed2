"""Adapting a trained classifier to a laboratory's own microscope with a few of its labelled cells (no Django).

``choose_cells`` picks the adaptation cells, :class:`Adaptation` computes and cross-validates the candidates
(BatchNormalization re-estimation, a new head, fine-tuning the last block), and ``adapt_model`` writes the
adapted model, its card and its detectors. See ``pipeline`` for the methods.
"""

from __future__ import annotations

from .cells import MIN_CELLS_PER_CLASS, AdaptationRefused, check_counts, choose_cells, unseen
from .output import adapt_model
from .pipeline import METHODS, Adaptation, AdaptConfig, Adapted, Candidate, choose

__all__ = [
    "METHODS",
    "MIN_CELLS_PER_CLASS",
    "AdaptConfig",
    "Adaptation",
    "AdaptationRefused",
    "Adapted",
    "Candidate",
    "adapt_model",
    "check_counts",
    "choose",
    "choose_cells",
    "unseen",
]
