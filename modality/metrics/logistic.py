"""One ridge logistic-regression solver for the two small fits on held-out predictions.

Why one module: the stacked fusion (:func:`modality.models.fusion.fit_stack`, a softmax over classes) and the
confidence map (:func:`modality.metrics.calibration.fit_confidence_map`, right or wrong) are both a
conditional logit, ``softmax_k(design[i, k] @ theta)``, with a ridge towards a prior. A binary logistic
regression on columns ``x`` is the two-alternative case whose first alternative's row is all zeros. Both
fits have a handful of parameters and at most a few thousand rows, so exact Newton steps converge in a few
iterations, deterministically, with no optimiser dependency; step halving keeps a step from overshooting
into saturation, where the curvature vanishes and the next step is larger still (a confidence map ran to a
slope of 717 on far-from-separable held-out series before it had it).
"""

from __future__ import annotations

import numpy as np

#: Newton stops when a step changes no parameter by more than this, or the objective by less than
#: :data:`_TINY_IMPROVEMENT` (both far below what any caller reads).
_TINY_STEP = 1e-9
_TINY_IMPROVEMENT = 1e-12


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, shifted by each row's maximum so that large scaled logits cannot overflow."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def fit_conditional_logit(
    design: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    ridge: float,
    prior: np.ndarray | None = None,
    iterations: int = 100,
) -> np.ndarray:
    """``theta`` minimising ``-sum_i w_i sum_k t_ik log softmax_k(design[i] @ theta) + ridge/2 |theta - prior|^2``.

    ``design``: (N, K, P), alternative ``k``'s features for row ``i``; ``targets``: (N,) alternative indices
    or (N, K) target probabilities (a soft 0/1 outcome included); ``weights``: (N,) row weights (default 1);
    ``prior``: (P,) what the ridge pulls towards (default 0), also the starting point. ``ridge`` > 0 makes
    the objective strictly convex, so the minimum is unique and finite even for separable rows.
    """
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    x = np.asarray(design, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"design must be (N, K, P), got shape {x.shape}")
    n, k, dims = x.shape
    t = np.asarray(targets)
    t = np.eye(k)[t.astype(np.int64)] if t.ndim == 1 else t.astype(np.float64)
    if t.shape != (n, k):
        raise ValueError(f"targets must be ({n},) or ({n}, {k}), got shape {t.shape}")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    centre = np.zeros(dims) if prior is None else np.asarray(prior, dtype=np.float64)
    mass = t.sum(axis=1)  # 1 per row for probabilities; kept general so the gradient stays exact

    def objective(theta: np.ndarray) -> float:
        data = -np.sum(w * np.sum(t * log_softmax_rows(x @ theta), axis=1))
        return float(data + 0.5 * ridge * np.sum((theta - centre) ** 2))

    theta = centre.copy()
    current = objective(theta)
    for _ in range(iterations):
        p = np.exp(log_softmax_rows(x @ theta))
        mean = np.einsum("ik,ikp->ip", p, x)  # each row's expected feature vector
        residual = mass[:, None] * p - t
        gradient = np.einsum("i,ikp->p", w, residual[:, :, None] * x) + ridge * (theta - centre)
        second = np.einsum("i,ik,ikp,ikq->pq", w * mass, p, x, x, optimize=True)
        hessian = second - np.einsum("i,ip,iq->pq", w * mass, mean, mean) + ridge * np.eye(dims)
        step = np.linalg.solve(hessian, gradient)
        size = 1.0
        candidate = objective(theta - step)
        while candidate > current and size > 1e-8:
            size /= 2
            candidate = objective(theta - size * step)
        if candidate > current:
            break  # no descent along Newton's direction: at the minimum to rounding
        theta, improvement, current = theta - size * step, current - candidate, candidate
        if improvement < _TINY_IMPROVEMENT or np.max(np.abs(size * step)) < _TINY_STEP:
            break
    return theta


def fit_binary_logistic(
    columns: np.ndarray,
    outcomes: np.ndarray,
    *,
    ridge: float,
    prior: np.ndarray | None = None,
    iterations: int = 100,
) -> np.ndarray:
    """Logistic regression ``P(outcome) = sigmoid(columns @ theta)`` for outcomes in [0, 1], ridge towards
    ``prior``: :func:`fit_conditional_logit` with a zero row for the "no" alternative."""
    x = np.asarray(columns, dtype=np.float64)
    y = np.asarray(outcomes, dtype=np.float64)
    design = np.stack([np.zeros_like(x), x], axis=1)
    targets = np.column_stack([1.0 - y, y])
    return fit_conditional_logit(design, targets, ridge=ridge, prior=prior, iterations=iterations)
