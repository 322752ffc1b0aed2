"""How far an adaptation is, in planned work units, and the chance to stop it between steps (no TensorFlow).

The pipeline calls :meth:`Progress.advance` after every step (a view's features, a head's cross-validation, a
fine-tuning epoch...). The caller's ``report(stage, fraction)`` runs there: a web job stores the progress and,
when someone pressed Cancel, raises :class:`Cancelled`, which unwinds the adaptation before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Report = Callable[[str, float], None]

# Relative cost of the steps (one unit: the features of one view of every cell), so that the share done says
# roughly how much time is left.
BATCHNORM_UNITS = 1.0
BN_CANDIDATE_UNITS = 0.5
HEAD_FIT_UNITS = 0.1  # one logistic-regression head on cached features (per fold)
EPOCH_UNITS = 0.5  # one fine-tuning epoch on cached activations (per fold)
DETECTOR_UNITS = 1.0
SAVE_UNITS = 0.5


class Cancelled(Exception):
    """Someone asked the adaptation to stop; raised from a progress report between two steps."""


def _ignore(stage: str, fraction: float) -> None:
    return None


@dataclass
class Progress:
    """The share of the planned work done; every step reports it (and may raise :class:`Cancelled`)."""

    report: Report = _ignore
    total: float = 1.0
    done: float = 0.0

    def plan(self, units: float) -> None:
        """Add planned work (steps that follow the adaptation: evaluation, registration)."""
        self.total += units

    def advance(self, stage: str, units: float = 1.0) -> None:
        self.done = min(self.total, self.done + units)
        self.report(stage, self.fraction)

    def at(self, stage: str) -> None:
        """A stage begins: report where we are (a chance to cancel) without counting work."""
        self.report(stage, self.fraction)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total > 0 else 0.0
