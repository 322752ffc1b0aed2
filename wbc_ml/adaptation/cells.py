"""Which of a lab's labelled cells adapt the model, and which are left unseen for the report (no TensorFlow)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..datasets import Sample

MIN_CELLS_PER_CLASS = 5
MAX_RARE_CLASSES = 1  # at most this many classes may have fewer than MIN_CELLS_PER_CLASS (but at least one) cell


class AdaptationRefused(ValueError):
    """Too few labelled cells to adapt (or to measure the adaptation); the message says what is missing."""


def check_counts(counts: dict[str, int]) -> list[str]:
    """Refuse too few cells; return the names of the rare classes that are accepted with a warning.

    Every class needs at least one cell, and all but ``MAX_RARE_CLASSES`` need ``MIN_CELLS_PER_CLASS``:
    a lab may truly see only a handful of basophils, but a head fitted on two or three cells of most classes
    (and a cross-validation on them) means nothing.
    """
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise AdaptationRefused(f"No labelled cells for {', '.join(missing)}: every class needs at least one.")
    rare = [name for name, n in counts.items() if n < MIN_CELLS_PER_CLASS]
    if len(rare) > MAX_RARE_CLASSES:
        shown = ", ".join(f"{name} {counts[name]}" for name in rare)
        raise AdaptationRefused(
            f"Too few labelled cells to adapt: at least {MIN_CELLS_PER_CLASS} per class are needed "
            f"(only one rare class may have fewer); got {shown}."
        )
    return rare


def choose_cells(samples: list[Sample], class_names: list[str], per_class: int, seed: int) -> list[Sample]:
    """``per_class`` random cells of each class, or half of a class (at least one) that has fewer than twice that."""
    if per_class < MIN_CELLS_PER_CLASS:
        raise AdaptationRefused(
            f"--train-per-class {per_class} is too few: adaptation needs at least {MIN_CELLS_PER_CLASS} labelled "
            "cells per class."
        )
    rng = np.random.default_rng(seed)
    chosen: list[Sample] = []
    for label, _ in enumerate(class_names):
        members = sorted((s for s in samples if s.label == label), key=lambda s: s.name)
        take = per_class if len(members) >= 2 * per_class else max(len(members) // 2, min(1, len(members)))
        picked = rng.choice(len(members), size=take, replace=False) if take else []
        chosen += [members[i] for i in sorted(picked)]
    check_counts({name: sum(s.label == i for s in chosen) for i, name in enumerate(class_names)})
    return chosen


def cell_key(path: Path | str, class_name: str) -> str:
    """How the card names a cell: '<class>/<file name>'."""
    return f"{class_name}/{Path(path).name}"


def unseen(samples: list[Sample], class_names: list[str], used: dict[str, list[str]]) -> list[Sample]:
    """The samples of a folder that the adaptation (``card['adaptation']['cells']``) did not use."""
    used_keys = {f"{name}/{file}" for name, files in used.items() for file in files}
    return [s for s in samples if cell_key(s.path, class_names[s.label]) not in used_keys]


def files_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()
