"""How the CNN and the value-statistics head become one answer: temperatures and fusion weights, fitted on
predictions the models made on sources they did not train on, never on the sources being reported.

Why fitted, not fixed: the fixed rule ``softmax(0.25 log p_cnn + log p_values)`` was chosen on the shared
corpus's own val/test sources and then let an over-confident value head override correct CNN calls on
outside data (issue 14). Here each head gets an inverse temperature (a scale ``s`` on its log-probabilities,
``softmax(s log p)``, so ``s < 1`` softens an over-confident head), and the fused answer is
``softmax(a log p_cnn + b log p_values)`` with ``(a, b)`` chosen by class-balanced log-loss on a grid that
contains ``(s_cnn, 0)``: on the data it is fitted on the fusion is never worse than the CNN alone.

Where the value head has nothing to say (the input carries no physical units: a PNG/JPEG export, an RGB
secondary capture) it abstains and the calibrated CNN answers alone; :func:`has_physical_units` decides.

The rows a calibration is fitted on must come from models that did not train on them: held-out folds of
``python -m modality.crossval`` (nested: each fold's calibration is fitted on the other folds' held-out
predictions, i.e. only on that fold's training sources), or a run's validation sources. The fitted values
travel as ``calibration.json``; ``eval.py calibration=<file>`` applies them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modality.metrics.calibration import ConfidenceMap

#: Scales tried for each head's log-probabilities (0 drops the head; 1 keeps its own confidence).
SCALE_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 3.0)
#: Formats whose decoded values are display values, not measurements: the value head abstains on them.
_UNITLESS_PHOTOMETRIC = ("RGB", "YBR", "PALETTE")
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".img", ".hdr")
_EPS = 1e-12


def has_physical_units(meta: Mapping[str, Any]) -> bool:
    """True when a slice's values are in the units its modality measures (HU, activity, MR signal integers,
    detector values): DICOM greyscale pixel data and NIfTI/Analyze/npy volumes. False for PNG/JPEG/PGM
    files and colour DICOM (secondary captures, screenshots): 8-bit display values of any modality, where
    the value statistics would only say "8-bit", which in a radiograph-only image corpus reads as X-ray.

    Works on a decoded slice's ``meta`` (has ``format``) and on a stored sample's JSON (has ``source_path``).
    """
    photometric = str(meta.get("photometric") or "").upper()
    if photometric.startswith(_UNITLESS_PHOTOMETRIC):
        return False
    if str(meta.get("transfer_syntax") or ""):
        return True  # DICOM (every DICOM slice records its transfer syntax)
    fmt = str(meta.get("format") or "").lower()
    if fmt:
        return fmt in ("nifti", "npy")
    return str(meta.get("source_path") or "").lower().endswith(_VOLUME_SUFFIXES)


def log_probabilities(p: np.ndarray) -> np.ndarray:
    """``log p`` with p clipped to [1e-12, 1] (a zero probability must not become -inf in a product)."""
    return np.log(np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0))


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, shifted by each row's maximum so that large scaled logits cannot overflow."""
    logits = logits - logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax_rows(logits))


def _row_weights(targets: np.ndarray, sources: np.ndarray | None) -> np.ndarray:
    """Per-row weights that make every class count alike and, within a class, every source alike: one
    source's 1,400 PET slices must not decide how PET from every other site is answered."""
    weights = np.zeros(len(targets))
    classes = np.unique(targets)
    for c in classes:
        in_class = targets == c
        groups = np.unique(sources[in_class]) if sources is not None else [None]
        for g in groups:
            rows = in_class & (sources == g) if sources is not None else in_class
            weights[rows] = 1.0 / (len(classes) * len(groups) * rows.sum())
    return weights


def _balanced_nll(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted mean negative log-likelihood; ``weights`` from :func:`_row_weights` (default: classes alike).
    Every class weighs alike (PET is a few percent of the slices and must not be traded away, as in balanced
    accuracy) and, with sources, every source within a class."""
    if len(targets) == 0:
        return math.inf
    if weights is None:
        weights = _row_weights(targets, None)
    losses = -log_softmax_rows(logits)[np.arange(len(targets)), targets]
    return float(np.sum(weights * losses))


def _best_scale(log_p: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> float:
    if len(targets) == 0:
        return 1.0
    scores = [(_balanced_nll(s * log_p, targets, weights), s) for s in SCALE_GRID if s > 0]
    return min(scores)[1]


@dataclass
class FusionCalibration:
    """Fitted scales: ``cnn_scale`` and ``values_scale`` calibrate each head alone; ``cnn_weight`` and
    ``values_weight`` fuse them where the value head answers. ``fitted_on`` says on what."""

    cnn_scale: float = 1.0
    values_scale: float = 1.0
    cnn_weight: float = 0.25
    values_weight: float = 1.0
    fitted_on: dict[str, Any] = field(default_factory=dict)
    # "unknown" below these confidences (a slice's top fused probability / a series vote's mean probability),
    # each the lowest that reached ``unknown_target_accuracy`` on held-out sources (crossval); None: never
    unknown_below_slice: float | None = None
    unknown_below_series: float | None = None
    unknown_target_accuracy: float | None = None
    # ConfidenceMap dicts (modality.metrics.calibration) fitted by crossval on held-out answers: what a stated
    # confidence (slice: top fused probability; series: the vote's mean probability and slice count) means;
    # the "unknown" thresholds above apply to the mapped confidence. None: the stated confidence as it is
    slice_confidence: dict[str, Any] | None = None
    series_confidence: dict[str, Any] | None = None

    def slice_map(self) -> ConfidenceMap:
        return ConfidenceMap.from_dict(self.slice_confidence) if self.slice_confidence else ConfidenceMap()

    def series_map(self) -> ConfidenceMap:
        return ConfidenceMap.from_dict(self.series_confidence) if self.series_confidence else ConfidenceMap()

    def cnn(self, cnn_probs: np.ndarray) -> np.ndarray:
        return softmax_rows(self.cnn_scale * log_probabilities(cnn_probs))

    def values(self, value_probs: np.ndarray) -> np.ndarray:
        return softmax_rows(self.values_scale * log_probabilities(value_probs))

    def fuse(
        self, cnn_probs: np.ndarray, value_probs: np.ndarray | None, answers: np.ndarray | None
    ) -> np.ndarray:
        """Fused probabilities: ``softmax(a log p_cnn + b log p_values)`` on rows where ``answers`` (the
        value head answered), the calibrated CNN alone elsewhere."""
        out = self.cnn(cnn_probs)
        if value_probs is None or answers is None or not np.any(answers):
            return out
        rows = np.flatnonzero(answers)
        logits = self.cnn_weight * log_probabilities(
            cnn_probs[rows]
        ) + self.values_weight * log_probabilities(value_probs[rows])
        out[rows] = softmax_rows(logits)
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".partial")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FusionCalibration:
        data = json.loads(Path(path).read_text())
        known = {
            k: data[k] for k in ("cnn_scale", "values_scale", "cnn_weight", "values_weight") if k in data
        }
        for key, value in known.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{path}: {key} must be a finite number >= 0, got {value!r}")
        unknown = {}
        for key in ("unknown_below_slice", "unknown_below_series", "unknown_target_accuracy"):
            value = data.get(key)
            if value is not None and not (
                isinstance(value, int | float) and math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"{path}: {key} must be a finite number >= 0 or null, got {value!r}")
            unknown[key] = None if value is None else float(value)
        maps = {}
        for key in ("slice_confidence", "series_confidence"):
            value = data.get(key)
            if value is not None:
                if not isinstance(value, dict):
                    raise ValueError(f"{path}: {key} must be a mapping or null, got {value!r}")
                try:
                    value = ConfidenceMap.from_dict(value).to_dict()
                except ValueError as error:
                    raise ValueError(f"{path}: {key}: {error}") from None
            maps[key] = value
        return cls(
            **{k: float(v) for k, v in known.items()},
            fitted_on=dict(data.get("fitted_on") or {}),
            **unknown,
            **maps,
        )


def fit_fusion(
    cnn_probs: np.ndarray,
    value_probs: np.ndarray,
    answers: np.ndarray,
    targets: np.ndarray,
    fitted_on: Mapping[str, Any] | None = None,
    sources: Sequence[str] | None = None,
) -> FusionCalibration:
    """Fit both heads' scales and the fusion weights by class-balanced log-loss on held-out predictions.

    ``cnn_probs``/``value_probs``: (N, C) probabilities (``value_probs`` rows where ``answers`` is False are
    ignored); ``targets``: class indices; ``sources``: each row's source (dataset), so that every source weighs
    alike within its class (without it, every row of a class weighs alike). The fusion grid includes ``(cnn_scale, 0)`` (the CNN alone), so the
    fitted fusion is never worse than the calibrated CNN on these rows.
    """
    cnn_probs = np.asarray(cnn_probs, dtype=np.float64)
    value_probs = np.asarray(value_probs, dtype=np.float64)
    answers = np.asarray(answers, dtype=bool)
    targets = np.asarray(targets, dtype=np.int64)
    groups = np.asarray(sources, dtype=object) if sources is not None else None
    if not (len(cnn_probs) == len(value_probs) == len(answers) == len(targets)) or (
        groups is not None and len(groups) != len(targets)
    ):
        raise ValueError("cnn_probs, value_probs, answers and targets must have one row per sample")
    if len(targets) == 0:
        raise ValueError("no held-out predictions to fit a calibration on")
    log_cnn = log_probabilities(cnn_probs)
    cnn_scale = _best_scale(log_cnn, targets, _row_weights(targets, groups))
    rows = np.flatnonzero(answers)
    values_scale, cnn_weight, values_weight = 1.0, cnn_scale, 0.0
    if len(rows):
        log_values = log_probabilities(value_probs[rows])
        weights = _row_weights(targets[rows], groups[rows] if groups is not None else None)
        values_scale = _best_scale(log_values, targets[rows], weights)
        best = (_balanced_nll(cnn_scale * log_cnn[rows], targets[rows], weights), cnn_scale, 0.0)
        for a in SCALE_GRID:
            for b in SCALE_GRID:
                if a == 0 and b == 0:
                    continue
                score = _balanced_nll(a * log_cnn[rows] + b * log_values, targets[rows], weights)
                if score < best[0] - 1e-9:
                    best = (score, a, b)
        _, cnn_weight, values_weight = best
    info = {
        "samples": len(targets),
        "with_values": len(rows),
        "weighting": "classes alike, sources alike within a class" if groups is not None else "classes alike",
        **dict(fitted_on or {}),
    }
    return FusionCalibration(cnn_scale, values_scale, cnn_weight, values_weight, info)


def decisions(
    calibration: FusionCalibration, cnn_probs: np.ndarray, value_probs: np.ndarray, answers: np.ndarray
) -> dict[str, np.ndarray]:
    """The three answers reported side by side: the CNN alone, the value head alone (NaN rows where it
    abstains), and the fused decision users get."""
    answers = np.asarray(answers, dtype=bool)
    values = np.full(np.shape(cnn_probs), np.nan)
    if np.any(answers):
        values[answers] = calibration.values(np.asarray(value_probs)[answers])
    return {
        "cnn": calibration.cnn(np.asarray(cnn_probs)),
        "values": values,
        "fused": calibration.fuse(np.asarray(cnn_probs), np.asarray(value_probs), answers),
    }


def stack_arrays(rows: Sequence[Sequence[float] | None], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Probability rows with gaps (None where the value head abstained) -> (N, C) array and answer mask."""
    out = np.full((len(rows), n_classes), 1.0 / n_classes)
    mask = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        if row is not None and len(row) == n_classes:
            out[i] = row
            mask[i] = True
    return out, mask
