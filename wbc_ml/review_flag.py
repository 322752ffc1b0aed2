"""The manual-review flag: a cell goes to review when its calibrated confidence is under the threshold, or when the
"not one of the five" detectors call it an outlier. One definition of the threshold's default and bounds."""

from __future__ import annotations

DEFAULT_THRESHOLD = 0.85
THRESHOLD_MIN, THRESHOLD_MAX = 0.50, 0.99


def needs_review(confidence: float, is_outlier: bool, threshold: float) -> bool:
    return confidence < threshold or is_outlier
