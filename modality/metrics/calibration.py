"""Calibration of predicted probabilities: expected calibration error and its reliability table.

A classifier that says 0.99 should be right 99% of the time; the raw-file header check (``header_mismatch``)
trusts confident predictions, so how far confidence drifts from accuracy is reported with every evaluation.

ECE here is the standard top-label, equal-width-bin estimate (Guo et al. 2017): the confidence of a sample
is its largest class probability; bin ``b`` of ``n_bins`` (15 by default) holds confidences in
``(b / n_bins, (b + 1) / n_bins]`` (the first bin also takes 0); ECE = sum over bins of
``(samples in bin / all samples) * |accuracy in bin - mean confidence in bin|``. Empty bins contribute 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modality.metrics.logistic import fit_binary_logistic

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
    return answer_reliability(confidence, correct, n_bins)


def answer_reliability(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_BINS
) -> list[dict[str, Any]]:
    """:func:`reliability_table` for answers given with a stated confidence (a series vote and its mean
    probability) rather than a probability row."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
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


def _ece(table: list[dict[str, Any]]) -> float:
    total = sum(row["count"] for row in table)
    if total == 0:
        return 0.0
    return float(
        sum(row["count"] / total * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"])
    )


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins; 0.0 for an empty input."""
    return _ece(reliability_table(probs, targets, n_bins))


def answer_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """ECE of answers given with a stated confidence, the same bins as :func:`expected_calibration_error`;
    0.0 for no answers."""
    return _ece(answer_reliability(confidence, correct, n_bins))


def classwise_ece(probs: np.ndarray, targets: np.ndarray, n_bins: int = DEFAULT_BINS) -> list[float]:
    """Per class ``c``: the calibration error of ``p_c`` as the probability that the answer is ``c`` (bins of
    ``p_c`` over every sample, accuracy = share of the bin whose target is ``c``). Top-label ECE only looks at
    the answer given; a curator filtering "every series with P(PT) > 0.9" relies on each class's column."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    out = []
    for c in range(probs.shape[1] if probs.ndim == 2 else 0):
        p = probs[:, c]
        hit = (targets == c).astype(np.float64)
        bins = _bin_indices(p, n_bins)
        error = 0.0
        for b in range(n_bins):
            members = bins == b
            if members.any():
                error += members.mean() * abs(hit[members].mean() - p[members].mean())
        out.append(float(error))
    return out


def vote(probs: np.ndarray, answers: Sequence[int] | None = None) -> tuple[int, float, float, np.ndarray]:
    """One series' answer from its slices' probabilities: ``(voted class, vote share, mean probability of the
    voted class, mean probability of every class)``. The majority of the slices' answers (``answers``, default
    each row's argmax), ties to the higher mean probability (then the lower index); the mean probability of
    the voted class is the confidence a curator reads (``series_votes.csv``), so it is what
    :func:`answer_ece` checks. The one rule for ``eval.py input=`` and crossval's series figures."""
    probs = np.asarray(probs, dtype=np.float64)
    mean = probs.mean(axis=0)
    picks = probs.argmax(axis=1) if answers is None else np.asarray(answers, dtype=np.int64)
    counts = np.bincount(picks, minlength=probs.shape[1])
    voted = max(range(probs.shape[1]), key=lambda c: (counts[c], mean[c], -c))
    return voted, float(counts[voted] / len(probs)), float(mean[voted]), mean


def group_votes(
    probs: np.ndarray, targets: np.ndarray, groups: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Per group (a series), in first-seen order: ``(voted class, confidence, target, names)``; the target is
    the majority of the group's row targets (ties to the lower index; a series has one true class)."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    members: dict[str, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    voted, confidence, target = [], [], []
    for rows in members.values():
        answer, _, conf, _ = vote(probs[rows])
        voted.append(answer)
        confidence.append(conf)
        target.append(int(np.bincount(targets[rows]).argmax()))
    return (
        np.asarray(voted, dtype=np.int64),
        np.asarray(confidence, dtype=np.float64),
        np.asarray(target, dtype=np.int64),
        list(members),
    )


def abstention_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float) -> float:
    """The lowest confidence threshold whose answered rows (confidence >= threshold) reach ``target_accuracy``;
    answering everything when all rows already do, nothing (threshold above 1) when no threshold does.

    Lowest, so as much as possible is answered: fitted on held-out predictions of the training folds, it is the
    "unknown" cut-off a model trained on those sources should use.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if len(confidence) == 0:
        return 0.0
    order = np.argsort(-confidence, kind="stable")
    running = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    sorted_conf = confidence[order]
    best = None
    for i in range(len(order)):
        # a threshold can only cut between distinct confidences: take the last row of a run of equal values
        if i + 1 < len(order) and sorted_conf[i + 1] == sorted_conf[i]:
            continue
        if running[i] >= target_accuracy:
            best = sorted_conf[i]
    return float(best) if best is not None else float(np.nextafter(1.0, 2.0))


def coverage_accuracy(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> dict[str, Any]:
    """Share of rows answered (confidence >= threshold) and accuracy over them (None when none are)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    answered = confidence >= threshold
    n = int(answered.sum())
    return {
        "threshold": float(threshold),
        "rows": len(confidence),
        "answered": n,
        "coverage": float(n / len(confidence)) if len(confidence) else 0.0,
        "accuracy": float(correct[answered].mean()) if n else None,
    }


@dataclass(frozen=True)
class ConfidenceMap:
    """A stated confidence -> the probability that the answer is right:
    ``sigmoid(slope * logit(c) + count_slope * log(slices) + intercept)``.

    Why: on held-out sources neither stated confidence means what it says (leave-one-source-out, 19 folds:
    slice ECE 0.115, series ECE 0.326; the series vote is right far more often than its mean probability).
    Fitted on answers given on sources the models did not train on (crossval's nested folds), it is the
    curator's ``confidence``; the identity map (slope 1, others 0) leaves a confidence as it is. ``slices``
    is a series' slice count, read only by maps written before 2026-12-06 (a count term fitted on series,
    dropped: it learnt how many images each source has per series; crossval's ``_chosen_map``). Never
    decreasing in ``c`` (:func:`fit_confidence_map` pins a negative slope at 0), so a threshold on it orders
    answers as the raw confidence does."""

    slope: float = 1.0
    count_slope: float = 0.0
    intercept: float = 0.0
    answers: int = 0  # how many held-out answers it was fitted on (0: identity, not fitted)

    def __call__(self, confidence: np.ndarray, slices: np.ndarray | None = None) -> np.ndarray:
        c = np.clip(np.asarray(confidence, dtype=np.float64), _CLIP, 1.0 - _CLIP)
        z = self.slope * np.log(c / (1.0 - c)) + self.intercept
        if slices is not None:
            z = z + self.count_slope * np.log(np.maximum(np.asarray(slices, dtype=np.float64), 1.0))
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict[str, float | int]:
        return {
            "slope": self.slope,
            "count_slope": self.count_slope,
            "intercept": self.intercept,
            "answers": self.answers,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfidenceMap:
        values = {
            k: data.get(k, default)
            for k, default in (("slope", 1.0), ("count_slope", 0.0), ("intercept", 0.0))
        }
        for key, value in values.items():
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise ValueError(f"confidence map {key} must be a finite number, got {value!r}")
        return cls(**{k: float(v) for k, v in values.items()}, answers=int(data.get("answers", 0)))


#: Confidences are clipped to [1e-6, 1 - 1e-6] before the logit (a saturated 1.0 must stay finite).
_CLIP = 1e-6


def fit_confidence_map(
    confidence: np.ndarray,
    correct: np.ndarray,
    *,
    prior_strength: float = 1.0,
    iterations: int = 100,
) -> ConfidenceMap:
    """Logistic regression of ``correct`` on ``logit(confidence)``, every answer weighted alike (ECE counts
    them alike). A ridge of ``prior_strength`` pulls the parameters towards the identity map, so a fit on few
    answers, or on answers that are all right, stays finite and close to "the confidence means what it says".
    Identity for no answers. (Crossval fits it on slices and reads series through it too; the map's
    ``count_slope`` is only read back from calibration files written before 2026-12-06.)

    The map never decreases with the stated confidence: where the fit's slope comes out negative (answers
    whose stated confidence says little on held-out sources), the slope is pinned at 0 and the intercept
    refitted, so a higher stated confidence never maps lower."""
    c = np.clip(np.asarray(confidence, dtype=np.float64), _CLIP, 1.0 - _CLIP)
    y = np.asarray(correct, dtype=np.float64)
    if len(c) == 0:
        return ConfidenceMap()
    x = np.column_stack([np.log(c / (1.0 - c)), np.ones(len(c))])
    prior = np.array([1.0, 0.0])
    w = fit_binary_logistic(x, y, ridge=prior_strength, prior=prior, iterations=iterations)
    if w[0] < 0:
        rest = fit_binary_logistic(x[:, 1:], y, ridge=prior_strength, prior=prior[1:], iterations=iterations)
        w = np.concatenate([[0.0], rest])
    return ConfidenceMap(float(w[0]), 0.0, float(w[-1]), len(c))
