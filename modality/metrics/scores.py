"""Test-set metrics from integer labels and predictions (plain numpy, so they can be checked by hand).

Definitions (written down because libraries disagree on the edge cases):
- accuracy: correct / all samples.
- per-class precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R); 0.0 where the
  denominator is 0; support = true samples of the class.
- balanced accuracy: mean recall over the classes *present in the true labels* (scikit-learn's definition,
  the one the reference study used). A class that the model predicts but the test set lacks does not count.
- macro-F1: mean F1 over the classes present in the true labels or the predictions (scikit-learn's default
  label set), so predicting a class that is absent is penalised here.
- confusion matrix: rows = true class, columns = predicted class; row-normalised divides each row by its
  support (rows without support stay 0).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_counts(targets: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` int64 counts, rows = true class, columns = predicted class."""
    targets = np.asarray(targets, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if targets.shape != predictions.shape:
        raise ValueError(f"targets {targets.shape} and predictions {predictions.shape} differ in shape")
    for name, values in (("targets", targets), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(f"{name} outside 0..{n_classes - 1}")
    flat = targets * n_classes + predictions
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def row_normalised(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the recall view); all-zero rows stay zero."""
    support = confusion.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(confusion, support, out=np.zeros(confusion.shape, np.float64), where=support > 0)


def _safe_ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def classification_summary(confusion: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix."""
    confusion = np.asarray(confusion, dtype=np.int64)
    total = int(confusion.sum())
    true_positive = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    per_class: dict[str, dict[str, float | int]] = {}
    for i, name in enumerate(classes):
        precision = _safe_ratio(true_positive[i], predicted[i])
        recall = _safe_ratio(true_positive[i], support[i])
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": _safe_ratio(2 * precision * recall, precision + recall),
            "support": int(support[i]),
            "predicted": int(predicted[i]),
        }
    present = [name for i, name in enumerate(classes) if support[i] > 0]
    scored = [name for i, name in enumerate(classes) if support[i] > 0 or predicted[i] > 0]
    return {
        "samples": total,
        "accuracy": _safe_ratio(true_positive.sum(), total),
        "balanced_accuracy": float(np.mean([per_class[c]["recall"] for c in present])) if present else 0.0,
        "macro_f1": float(np.mean([per_class[c]["f1"] for c in scored])) if scored else 0.0,
        "per_class": per_class,
    }


def accuracy_by_group(
    groups: Sequence[str], targets: np.ndarray, predictions: np.ndarray, classes: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per group (dataset, body part): count, correct, accuracy and which classes it holds and gets.

    This is the generalisation analysis: one unseen dataset failing hides inside a good overall accuracy.
    """
    targets = np.asarray(targets)
    predictions = np.asarray(predictions)
    if not len(groups) == len(targets) == len(predictions):
        raise ValueError("groups, targets and predictions must have the same length")
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[str(group)].append(index)
    table: dict[str, dict[str, Any]] = {}
    for group in sorted(members):
        idx = np.asarray(members[group])
        correct = int((targets[idx] == predictions[idx]).sum())
        true_counts = np.bincount(targets[idx], minlength=len(classes))
        predicted_counts = np.bincount(predictions[idx], minlength=len(classes))
        table[group] = {
            "count": len(idx),
            "correct": correct,
            "accuracy": correct / len(idx),
            "true": {c: int(n) for c, n in zip(classes, true_counts, strict=True) if n},
            "predicted": {c: int(n) for c, n in zip(classes, predicted_counts, strict=True) if n},
        }
    return table
