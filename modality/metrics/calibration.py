"""Calibration of predicted probabilities: expected calibration error and its reliability table.

A classifier that says 0.99 should be right 99% of the time; the raw-file header check (``header_mismatch``)
trusts confident predictions, so how far confidence drifts from accuracy is reported with every evaluation.

ECE here is the standard top-label, equal-width-bin estimate (Guo et al. 2017): the confidence of a sample
is its largest class probability; bin ``b`` of ``n_bins`` (15 by default) holds confidences in
``(b / n_bins, (b + 1) / n_bins]`` (the first bin also takes 0); ECE = sum over bins of
``(samples in bin / all samples) * |accuracy in bin - mean confidence in bin|``. Empty bins contribute 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_BINS = 15


def _bin_indices(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Right-closed equal-width bins over [0, 1]: 1.0 lands in the last bin, 0.0 in the first."""
    return np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)


def reliability_table(
    probs: np.ndarray, targets: np.ndarray, n_bins: int = DEFAULT_BINS
) -> list[dict[str, Any]]:
    """Per bin: its edges, sample count, accuracy and mean confidence (None for empty bins)."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if probs.ndim != 2 or len(probs) != len(targets):
        raise ValueError(
            f"probs must be (n, classes) matching targets; got {probs.shape} and {targets.shape}"
        )
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = probs.argmax(axis=1) == targets if len(probs) else np.zeros(0, bool)
    bins = _bin_indices(confidence, n_bins)
    table = []
    for b in range(n_bins):
        members = bins == b
        count = int(members.sum())
        table.append(
            {
                "low": b / n_bins,
                "high": (b + 1) / n_bins,
                "count": count,
                "accuracy": float(correct[members].mean()) if count else None,
                "confidence": float(confidence[members].mean()) if count else None,
            }
        )
    return table


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins; 0.0 for an empty input."""
    table = reliability_table(probs, targets, n_bins)
    total = sum(row["count"] for row in table)
    if total == 0:
        return 0.0
    return float(
        sum(row["count"] / total * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"])
    )
