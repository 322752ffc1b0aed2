"""Views of a square cell image that a classifier should treat alike: its quarter turns and mirror images.

A cell on a slide has no up or down, so a lab's adapted model may be served as the average of an image's four
quarter turns (its card's ``quarter_turns``, chosen by the adaptation's cross-validation). On BCCD the cross-validation
chose it in 10 of 15 draws, and the new head of MobileNetV2 fine-tuned (before: four random views, the image alone)
went from 77.3% to 79.5% with 20 cells per class, 70.5% to 73.9% with 10 and 63.1% to 67.9% with 5
(``benchmarks/adaptation_bccd.md``). The rule is written here once and used by serving, evaluation and adaptation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CARD_KEY = "quarter_turns"  # how many quarter turns of each image are averaged (1: the image as it is)
SYMMETRIES = 8  # the dihedral group of a square: four quarter turns, each also mirrored


def quarter_turns(x: np.ndarray, turns: int) -> list[np.ndarray]:
    """``x`` (N, H, W, C) turned by 0 .. ``turns`` - 1 quarter turns (the first is ``x`` itself)."""
    if turns > 1 and x.shape[1] != x.shape[2]:
        raise ValueError(f"quarter turns need square images, not {x.shape[1]}x{x.shape[2]}")
    return [x] + [np.ascontiguousarray(np.rot90(x, k, axes=(1, 2))) for k in range(1, turns)]


def symmetries(x: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetric views of square images: view 2k is ``x`` turned k quarter turns, view 2k + 1 that mirrored."""
    views = []
    for turned in quarter_turns(x, 4):
        views += [turned, np.ascontiguousarray(turned[:, :, ::-1])]
    return views


def turn_views(turns: int) -> list[int]:
    """The indices, among :func:`symmetries`, of the first ``turns`` quarter turns."""
    return [2 * k for k in range(turns)]


def averaged_over_turns(
    first: np.ndarray, run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, turns: int
) -> np.ndarray:
    """The mean of ``run`` over the quarter turns of ``x``, given ``first`` = ``run(x)`` (already computed)."""
    if turns <= 1:
        return first
    return np.mean([first] + [run(turned) for turned in quarter_turns(x, turns)[1:]], axis=0)
