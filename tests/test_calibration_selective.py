"""Class-wise calibration, series pooling and the "unknown" threshold (issue 19), on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest

from modality.metrics.calibration import (
    ConfidenceMap,
    abstention_threshold,
    answer_ece,
    classwise_ece,
    coverage_accuracy,
    expected_calibration_error,
    fit_confidence_map,
    group_votes,
    vote,
)


def test_classwise_ece_is_zero_when_each_column_is_a_frequency_and_not_otherwise() -> None:
    # 10 rows saying (0.8, 0.2): 8 are class 0 -> calibrated in both columns
    probs = np.tile([0.8, 0.2], (10, 1))
    targets = np.array([0] * 8 + [1] * 2)
    assert classwise_ece(probs, targets) == pytest.approx([0.0, 0.0])
    # the same confidence with only 5 right: off by 0.3 in each column
    assert classwise_ece(probs, np.array([0] * 5 + [1] * 5)) == pytest.approx([0.3, 0.3])
    assert expected_calibration_error(probs, np.array([0] * 5 + [1] * 5)) == pytest.approx(0.3)


def test_a_series_answers_by_majority_with_the_mean_probability_of_its_answer() -> None:
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.55, 0.45]])
    targets = np.array([0, 0, 0, 1, 1, 1])
    voted, confidence, target, names = group_votes(probs, targets, ["s1", "s1", "s1", "s2", "s3", "s3"])
    assert names == ["s1", "s2", "s3"]
    assert list(voted) == [0, 1, 0]  # s1: 2 of 3 say 0; s3: one each, the mean ties (0.5, 0.5) -> lower index
    assert confidence == pytest.approx([0.6, 0.8, 0.5])
    assert list(target) == [0, 1, 1]
    assert answer_ece(confidence, voted == target) == pytest.approx((0.4 + 0.2 + 0.5) / 3)
    assert vote(np.array([[0.6, 0.4], [0.1, 0.9]]))[0] == 1  # one vote each: the higher mean (0.65) wins


def test_threshold_is_the_lowest_that_reaches_the_target_accuracy() -> None:
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, True, False, True, False])
    # answered at >= 0.9: 3/3; at >= 0.7: 4/5 = 0.8; at >= 0.6: 4/6
    assert abstention_threshold(confidence, correct, 0.95) == pytest.approx(0.9)
    assert abstention_threshold(confidence, correct, 0.8) == pytest.approx(0.7)
    assert abstention_threshold(confidence, correct, 0.5) == pytest.approx(0.6)  # everything answered
    assert abstention_threshold(confidence, ~correct, 0.99) > 1.0  # nothing reaches it: answer nothing
    row = coverage_accuracy(confidence, correct, 0.7)
    assert (row["answered"], row["coverage"], row["accuracy"]) == (
        5,
        pytest.approx(5 / 6),
        pytest.approx(0.8),
    )


def test_a_threshold_never_splits_rows_of_equal_confidence() -> None:
    confidence = np.array([0.9, 0.8, 0.8, 0.8])
    correct = np.array([True, True, False, False])
    # cutting inside the 0.8 run is impossible: >= 0.8 answers all four (0.5), so 0.75 needs >= 0.9
    assert abstention_threshold(confidence, correct, 0.75) == pytest.approx(0.9)


def test_the_identity_map_keeps_a_confidence_and_a_fit_learns_what_it_means() -> None:
    stated = np.array([0.3, 0.6, 0.9, 0.99])
    assert ConfidenceMap()(stated) == pytest.approx(stated)
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.5, 0.8, size=2000)
    correct = rng.random(2000) < confidence**0.25  # right far more often than stated (under-confident)
    mapping = fit_confidence_map(confidence, correct)
    assert mapping.slope > 0 and mapping.answers == 2000
    fresh = rng.uniform(0.5, 0.8, size=2000)
    fresh_correct = rng.random(2000) < fresh**0.25
    assert answer_ece(fresh, fresh_correct) > 0.15
    assert answer_ece(mapping(fresh), fresh_correct) < 0.03
    assert np.all(np.diff(mapping(np.sort(fresh))) >= 0)  # monotone: the order of answers is kept


def test_a_map_fitted_on_answers_that_are_all_right_stays_finite_and_near_the_identity() -> None:
    mapping = fit_confidence_map(np.array([0.9, 0.95, 0.99]), np.array([True, True, True]))
    assert all(np.isfinite([mapping.slope, mapping.intercept]))
    assert 0.9 < mapping(np.array([0.9]))[0] < 1.0
    assert fit_confidence_map(np.zeros(0), np.zeros(0, bool)) == ConfidenceMap()
    assert ConfidenceMap.from_dict(mapping.to_dict()) == mapping
    with pytest.raises(ValueError, match="slope"):
        ConfidenceMap.from_dict({"slope": float("nan")})


def test_a_map_fit_does_not_diverge_and_never_decreases_with_confidence() -> None:
    """Held-out answers like crossval's: mostly right, the stated confidence LOWER for the right ones. Plain
    Newton steps ran to slope ~700 on such data; the fitted map must stay finite, never decrease in the
    stated confidence (slope pinned at 0), and calibrate the answers it was fitted on on average."""
    rng = np.random.default_rng(0)
    n = 250
    right = rng.random(n) < 0.92
    confidence = np.clip(rng.normal(0.7, 0.05, n) - 0.2 * right, 0.26, 0.9999)  # right: LOWER
    mapping = fit_confidence_map(confidence, right)
    assert mapping.slope == 0.0 and abs(mapping.intercept) < 10 and mapping.count_slope == 0.0
    mapped = mapping(confidence)
    assert np.all(np.diff(mapping(np.sort(confidence))) >= 0)
    assert answer_ece(mapped, right) < 0.05 < answer_ece(confidence, right)
