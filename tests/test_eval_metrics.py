"""Evaluation metrics agree with hand-computed values, including the edge cases libraries disagree on."""

from __future__ import annotations

import numpy as np
import pytest

from modality.metrics.calibration import expected_calibration_error, reliability_table
from modality.metrics.scores import (
    accuracy_by_group,
    classification_summary,
    confusion_counts,
    row_normalised,
)

CLASSES = ["CT", "MR", "PT", "XR"]


def test_confusion_rows_are_true_class() -> None:
    targets = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 1, 0])
    confusion = confusion_counts(targets, predictions, 4)
    assert confusion[0].tolist() == [1, 2, 0, 0]
    assert confusion[2].tolist() == [1, 0, 0, 0]
    assert confusion.sum() == 6
    normalised = row_normalised(confusion)
    assert normalised[0].tolist() == pytest.approx([1 / 3, 2 / 3, 0, 0])
    assert normalised[3].tolist() == [0, 0, 0, 0]  # no XR support: stays zero, no NaN


def test_summary_matches_hand_computation() -> None:
    targets = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 1, 3])  # XR predicted once but absent from the truth
    summary = classification_summary(confusion_counts(targets, predictions, 4), CLASSES)
    assert summary["accuracy"] == pytest.approx(3 / 6)
    # recall CT 1/3, MR 1, PT 0; XR has no support and is left out of balanced accuracy
    assert summary["balanced_accuracy"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    ct = summary["per_class"]["CT"]
    assert (ct["precision"], ct["recall"], ct["support"]) == (1.0, pytest.approx(1 / 3), 3)
    assert ct["f1"] == pytest.approx(0.5)
    mr = summary["per_class"]["MR"]
    assert mr["precision"] == pytest.approx(0.5) and mr["f1"] == pytest.approx(2 / 3)
    # macro-F1 over classes in truth or predictions: CT .5, MR 2/3, PT 0, XR 0
    assert summary["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 4)


def test_bad_labels_raise() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_counts(np.array([0, 5]), np.array([0, 1]), 4)


def test_accuracy_by_group_counts_every_sample() -> None:
    groups = ["a", "a", "b", "b", "b"]
    table = accuracy_by_group(groups, np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 1]), CLASSES)
    assert table["a"] == {
        "count": 2,
        "correct": 1,
        "accuracy": 0.5,
        "true": {"CT": 2},
        "predicted": {"CT": 1, "MR": 1},
    }
    assert table["b"]["count"] == 3 and table["b"]["correct"] == 2
    assert sum(row["count"] for row in table.values()) == 5


def test_ece_hand_example() -> None:
    # Two samples at confidence 0.9 (one right), two at 0.6 (both right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    targets = np.array([0, 1, 0, 1])
    # bin of 0.9: acc .5, conf .9 -> |.4| * 2/4; bin of 0.6: acc 1, conf .6 -> |.4| * 2/4
    assert expected_calibration_error(probs, targets) == pytest.approx(0.4)
    table = reliability_table(probs, targets)
    assert len(table) == 15 and sum(row["count"] for row in table) == 4
    assert table[-1]["count"] == 0 and table[-1]["accuracy"] is None


def test_ece_perfectly_confident_and_right_is_zero() -> None:
    probs = np.eye(4)[[0, 1, 2, 3]]
    assert expected_calibration_error(probs, np.array([0, 1, 2, 3])) == 0.0
    assert reliability_table(probs, np.array([0, 1, 2, 3]))[-1]["count"] == 4
    assert expected_calibration_error(np.zeros((0, 4)), np.zeros(0, int)) == 0.0
