"""The one ridge logistic solver behind the stacked fusion and the confidence map."""

from __future__ import annotations

import numpy as np
import pytest

from modality.metrics.logistic import fit_binary_logistic, fit_conditional_logit


def _binary_gradient(x: np.ndarray, y: np.ndarray, theta: np.ndarray, ridge: float, prior: np.ndarray):
    p = 1.0 / (1.0 + np.exp(-(x @ theta)))
    return x.T @ (p - y) + ridge * (theta - prior)


def test_binary_fit_is_the_penalised_minimum() -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(size=400), np.ones(400)])
    y = (rng.random(400) < 1.0 / (1.0 + np.exp(-(2.0 * x[:, 0] - 0.5)))).astype(float)
    prior = np.array([1.0, 0.0])
    theta = fit_binary_logistic(x, y, ridge=1.0, prior=prior)
    assert np.abs(_binary_gradient(x, y, theta, 1.0, prior)).max() < 1e-6
    assert 1.5 < theta[0] < 2.6 and -0.9 < theta[1] < -0.1  # near the generating (2, -0.5)


def test_separable_rows_stay_finite_and_the_prior_wins_without_data() -> None:
    x = np.column_stack([np.linspace(-3, 3, 50), np.ones(50)])
    y = (x[:, 0] > 0).astype(float)  # perfectly separable: unpenalised Newton runs to infinity
    theta = fit_binary_logistic(x, y, ridge=0.1)
    assert np.all(np.isfinite(theta)) and 0 < theta[0] < 100
    prior = np.array([0.7, -0.2])
    assert np.allclose(fit_binary_logistic(x[:0], y[:0], ridge=1.0, prior=prior), prior)


def test_binary_is_the_two_alternative_conditional_logit_with_soft_targets() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3))
    y = rng.random(200)  # soft outcomes in [0, 1]
    binary = fit_binary_logistic(x, y, ridge=0.5)
    # the same model written with the "no" alternative carrying -x and "yes" 0: theta flips sign
    design = np.stack([x, np.zeros_like(x)], axis=1)
    flipped = fit_conditional_logit(design, np.column_stack([1.0 - y, y]), ridge=0.5)
    assert np.allclose(binary, -flipped, atol=1e-8)


def test_multiclass_weights_count_rows() -> None:
    """A row of weight 2 fits exactly as the same row given twice."""
    rng = np.random.default_rng(2)
    design = rng.normal(size=(60, 3, 4))
    targets = rng.integers(0, 3, 60)
    weights = np.ones(60)
    weights[:10] = 2.0
    doubled = fit_conditional_logit(
        np.concatenate([design, design[:10]]), np.concatenate([targets, targets[:10]]), ridge=0.3
    )
    assert np.allclose(fit_conditional_logit(design, targets, weights, ridge=0.3), doubled, atol=1e-8)


def test_bad_arguments_are_refused() -> None:
    design = np.zeros((4, 2, 3))
    with pytest.raises(ValueError, match="ridge"):
        fit_conditional_logit(design, np.zeros(4, dtype=int), ridge=0.0)
    with pytest.raises(ValueError, match="design"):
        fit_conditional_logit(np.zeros((4, 3)), np.zeros(4, dtype=int), ridge=1.0)
    with pytest.raises(ValueError, match="targets"):
        fit_conditional_logit(design, np.zeros((4, 3)), ridge=1.0)
