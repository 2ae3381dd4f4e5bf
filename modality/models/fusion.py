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

Where both heads answer, the fusion is chosen between that product rule and a **stacked** fusion with one
weight per head *and class*, ``softmax_c(a_c log p_cnn[c] + b_c log p_values[c] + d_c)``, fitted by ridge
logistic regression (:func:`fit_stack`). One weight per head cannot say that the value head's "PET" is
reliable (PET stores integers filling the signed 16-bit range) while its "X-ray" on DICOM is not, or that the
CNN's "PET" is often an MR phantom: with the product rule fitted on the corpus's other sources, the CNN
outvoted a right value head on a brain PET site it had never seen. The candidates (product rule, stack at each
ridge of :data:`RIDGE_GRID`) are compared by grouped cross-validation over the fitting rows' groups (the
crossval folds, else the sources), scored by the class- and source-balanced Brier score, a bounded proper
score: a log-loss let a few confident errors of one group swing the choice of ridge between its extremes.

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
from modality.metrics.logistic import fit_conditional_logit, log_softmax_rows
from modality.readers.raw_volume import RAW_VOLUME_SUFFIXES
from modality.readers.volume import FREESURFER_SUFFIXES, NIFTI_FILE_SUFFIXES, VOLUME_FORMATS

#: Scales tried for each head's log-probabilities (0 drops the head; 1 keeps its own confidence).
SCALE_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 3.0)
#: Ridge strengths tried for the stacked fusion. The fitting rows' weights sum to 1 (classes alike, sources
#: alike within a class), so a ridge of 10 is a prior worth ten times the whole data: the held-out predictions
#: of ~20 sources are few independent facts, whatever their row count.
RIDGE_GRID = (0.1, 1.0, 10.0, 100.0)
#: Formats whose decoded values are display values, not measurements: the value head abstains on them.
_UNITLESS_PHOTOMETRIC = ("RGB", "YBR", "PALETTE")
_VOLUME_SUFFIXES = (*NIFTI_FILE_SUFFIXES, *FREESURFER_SUFFIXES, ".npy", ".img", ".hdr", *RAW_VOLUME_SUFFIXES)
_EPS = 1e-12


def has_physical_units(meta: Mapping[str, Any]) -> bool:
    """True when a slice's values are in the units its modality measures (HU, activity, MR signal integers,
    detector values): DICOM greyscale pixel data and NIfTI/Analyze/MetaImage/NRRD/npy volumes stored wider
    than 8 bits. False for PNG/JPEG/PGM files, colour DICOM (secondary captures, screenshots) and volumes
    stored as 8-bit integers (:func:`stored_as_8bit`): display values of any modality, where the value
    statistics would only say "8-bit", which in a radiograph-only image corpus reads as X-ray.

    Works on a decoded slice's ``meta`` (has ``format``) and on a stored sample's JSON (has ``source_path``).
    """
    photometric = str(meta.get("photometric") or "").upper()
    if photometric.startswith(_UNITLESS_PHOTOMETRIC):
        return False
    if str(meta.get("transfer_syntax") or ""):
        return True  # DICOM (every DICOM slice records its transfer syntax)
    fmt = str(meta.get("format") or "").lower()
    volume = (
        fmt in VOLUME_FORMATS
        if fmt
        else str(meta.get("source_path") or "").lower().endswith(_VOLUME_SUFFIXES)
    )
    return volume and not stored_as_8bit(meta)


def stored_as_8bit(meta: Mapping[str, Any]) -> bool:
    """True when a slice's stored values are 8-bit integers (``meta["dtype"]`` uint8/int8).

    Why a volume stored so has no physical units: no modality's unit fits in 8 bits (HU span -1024..3000+, PET
    activities and MR signal run to thousands), so a uint8 NIfTI/MetaImage/NRRD/npy volume holds display
    values: a windowed CT/MR/PET converted from PNG/JPEG stacks or normalised for a pipeline (FreeSurfer's
    conformed T1). Scored as if the held-out slices of the shared corpus came so (``python
    scripts/value_head_loso.py ... --groups --as-8bit``, 2026-12-06), the value head called every PET slice
    MR and three in four CT slices MR or X-ray (balanced 0.466, against 0.977 as stored; the CNN alone on
    8-bit exports of the same slices: 0.569), so it abstains there as on PNG/JPEG. DICOM is not judged by
    this: its modality LUT puts 8-bit stored values into the modality's units."""
    try:
        dtype = np.dtype(str(meta.get("dtype") or ""))
    except TypeError:
        return False
    return dtype.kind in "iu" and dtype.itemsize == 1


def log_probabilities(p: np.ndarray) -> np.ndarray:
    """``log p`` with p clipped to [1e-12, 1] (a zero probability must not become -inf in a product)."""
    return np.log(np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0))


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
    # The stacked fusion (:func:`fit_stack`): 3C numbers, each class's CNN weight, value-head weight and
    # offset (:func:`stack_features`); when set it replaces ``cnn_weight``/``values_weight`` where the value
    # head answers. None: the product rule
    stack_weights: list[float] | None = None
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
        self,
        cnn_probs: np.ndarray,
        value_probs: np.ndarray | None,
        answers: np.ndarray | None,
        product_rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """Fused probabilities on rows where ``answers`` (the value head answered): the stacked fusion when
        fitted, else ``softmax(a log p_cnn + b log p_values)``; the calibrated CNN alone elsewhere.

        ``product_rows`` (bool per row) take the product rule even where a stack is fitted: the rows the
        float value head answered. The stack's per-class trust was learned from the main head's answers
        (its "PET" is reliable because PET fills the int16 range); applied to the float head, which cannot
        tell PET from MR, it turned MR into PET (held-out MR as floats: 0.69 stacked, 0.91 product)."""
        out = self.cnn(cnn_probs)
        if value_probs is None or answers is None or not np.any(answers):
            return out
        answered = np.asarray(answers, dtype=bool)
        plain = np.zeros_like(answered) if product_rows is None else np.asarray(product_rows, dtype=bool)
        stacked = answered & ~plain if self.stack_weights is not None else np.zeros_like(answered)
        for rows, stack in ((np.flatnonzero(stacked), True), (np.flatnonzero(answered & ~stacked), False)):
            if rows.size == 0:
                continue
            log_cnn, log_values = log_probabilities(cnn_probs[rows]), log_probabilities(value_probs[rows])
            if stack:
                logits = stack_logits(stack_features(log_cnn, log_values), np.asarray(self.stack_weights))
            else:
                logits = self.cnn_weight * log_cnn + self.values_weight * log_values
            out[rows] = softmax_rows(logits)
        return out

    @property
    def rule(self) -> str:
        """How the heads are combined where both answer, in words (logs, reports)."""
        if self.stack_weights is not None:
            return f"stacked (ridge {self.fitted_on.get('ridge', '?')})"
        return f"{self.cnn_weight:g} log p_cnn + {self.values_weight:g} log p_values"

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
        stack = data.get("stack_weights")
        if stack is not None:
            vector = np.asarray(stack, dtype=np.float64) if isinstance(stack, list) else np.zeros(0)
            if vector.ndim != 1 or not len(vector) or len(vector) % 3 or not np.isfinite(vector).all():
                raise ValueError(
                    f"{path}: stack_weights must be 3C finite numbers for C classes, got {stack!r}"
                )
            stack = vector.tolist()
        return cls(
            **{k: float(v) for k, v in known.items()},
            fitted_on=dict(data.get("fitted_on") or {}),
            stack_weights=stack,
            **unknown,
            **maps,
        )


def stack_features(log_cnn: np.ndarray, log_values: np.ndarray) -> np.ndarray:
    """The stacked fusion's design, (N, C, 3C): class ``c``'s logit reads ``a_c log p_cnn[c] + b_c
    log p_values[c] + d_c``, so parameter ``c`` is the CNN's weight on class c, ``C + c`` the value head's and
    ``2C + c`` the class's offset. Each head's trust may differ by class (the value head's "PET" is reliable,
    its "X-ray" is not), but one class's score never reads another class's probability: with a few dozen
    DICOM radiographs weighing as much as a thousand PET slices, a full matrix learned quirks such as
    "the value head rules out PET, so X-ray" and called MR series X-ray."""
    n, c = log_cnn.shape
    design = np.zeros((n, c, 3 * c))
    index = np.arange(c)
    design[:, index, index] = log_cnn
    design[:, index, c + index] = log_values
    design[:, index, 2 * c + index] = 1.0
    return design


def stack_logits(design: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, C) logits of a :func:`stack_features` design under a parameter vector."""
    return design @ np.asarray(weights, dtype=np.float64)


def fit_stack(design: np.ndarray, targets: np.ndarray, weights: np.ndarray, ridge: float) -> np.ndarray:
    """Conditional-logit regression ``softmax(design @ theta)`` minimising ``sum_i w_i nll_i + ridge/2 |theta|^2``
    (:func:`modality.metrics.logistic.fit_conditional_logit`: exact Newton steps with step halving, strictly
    convex for ridge > 0). Every parameter is penalised, offsets too, so a class absent from the rows gets a
    finite, low logit."""
    return fit_conditional_logit(design, targets, weights, ridge=ridge)


def balanced_brier(probs: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> float:
    """Weighted Brier score ``sum_i w_i |p_i - onehot_i|^2`` (weights from :func:`_row_weights`)."""
    onehot = np.eye(probs.shape[1])[np.asarray(targets, dtype=np.int64)]
    return float(np.sum(np.asarray(weights) * np.sum((probs - onehot) ** 2, axis=1)))


def _fit_product(
    log_cnn: np.ndarray, log_values: np.ndarray, targets: np.ndarray, weights: np.ndarray, cnn_scale: float
) -> tuple[float, float]:
    """The product rule's weights ``(a, b)`` for ``softmax(a log p_cnn + b log p_values)``, by balanced log-loss
    on a grid that contains ``(cnn_scale, 0)``, the CNN alone."""
    best = (_balanced_nll(cnn_scale * log_cnn, targets, weights), cnn_scale, 0.0)
    for a in SCALE_GRID:
        for b in SCALE_GRID:
            if a == 0 and b == 0:
                continue
            score = _balanced_nll(a * log_cnn + b * log_values, targets, weights)
            if score < best[0] - 1e-9:
                best = (score, a, b)
    return best[1], best[2]


def _candidate_probs(
    candidate: float | None,
    train: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Fit one candidate on ``train`` (log p_cnn, log p_values, targets, weights) and answer ``test``'s rows:
    ``None`` is the product rule, a number the stack at that ridge."""
    log_cnn, log_values, targets, weights = train
    if candidate is None:
        cnn_scale = _best_scale(log_cnn, targets, weights)
        a, b = _fit_product(log_cnn, log_values, targets, weights, cnn_scale)
        return softmax_rows(a * test[0] + b * test[1])
    theta = fit_stack(stack_features(log_cnn, log_values), targets, weights, candidate)
    return softmax_rows(stack_logits(stack_features(*test), theta))


def scorable_rows(targets: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Rows whose class also occurs in another group: under leave-one-group-out only they can say how well a
    rule transfers (as in crossval's outer folds, a class the fitting rows lack says nothing about how to
    combine the heads)."""
    scored = np.zeros(len(targets), dtype=bool)
    for group in np.unique(groups):
        test = groups == group
        scored[test] = np.isin(targets[test], targets[~test])
    return scored


def choose_fusion(
    log_cnn: np.ndarray,
    log_values: np.ndarray,
    targets: np.ndarray,
    sources: np.ndarray | None,
    groups: np.ndarray,
) -> tuple[float | None, dict[str, float]]:
    """The combination rule for rows where both heads answer, chosen by leave-one-group-out over ``groups``:
    the product rule (None) or the stack at a ridge of :data:`RIDGE_GRID`, whichever gives the lowest
    balanced Brier score on the groups it did not see. A held-out row counts only where its class is among
    the other groups' rows (leaving out the one group that holds a class's data tests nothing but its
    absence, and would always favour the class-blind product rule). Fewer than two groups, or no row to
    score: the product rule, which on the rows it is fitted on is never worse than the CNN alone (nothing
    shows that a stack would transfer)."""
    unique = np.unique(groups)
    scored = scorable_rows(targets, groups)
    if len(unique) < 2 or not scored.any():
        return None, {}
    candidates: list[float | None] = [None, *RIDGE_GRID]
    held = {c: np.zeros((len(targets), log_cnn.shape[1])) for c in candidates}
    for group in unique:
        test = groups == group
        train = ~test
        weights = _row_weights(targets[train], sources[train] if sources is not None else None)
        for candidate in candidates:
            held[candidate][test] = _candidate_probs(
                candidate,
                (log_cnn[train], log_values[train], targets[train], weights),
                (log_cnn[test], log_values[test]),
            )
    weights = _row_weights(targets[scored], sources[scored] if sources is not None else None)
    scores = {c: balanced_brier(held[c][scored], targets[scored], weights) for c in candidates}
    best = min(candidates, key=lambda c: scores[c])
    return best, {"product" if c is None else f"stack ridge {c:g}": v for c, v in scores.items()}


def fit_fusion(
    cnn_probs: np.ndarray,
    value_probs: np.ndarray,
    answers: np.ndarray,
    targets: np.ndarray,
    fitted_on: Mapping[str, Any] | None = None,
    sources: Sequence[str] | None = None,
    groups: Sequence[Any] | None = None,
) -> FusionCalibration:
    """Fit both heads' scales and their combination on held-out predictions.

    ``cnn_probs``/``value_probs``: (N, C) probabilities (``value_probs`` rows where ``answers`` is False are
    ignored); ``targets``: class indices; ``sources``: each row's source (dataset), so that every source weighs
    alike within its class (without it, every row of a class weighs alike); ``groups``: the units the
    combination rule is cross-validated over (crossval's folds; default: the sources, else one group).

    Each head's scale is fitted by balanced log-loss on a grid. Where both answer, the rule is the product
    ``softmax(a log p_cnn + b log p_values)`` (grid containing ``(cnn_scale, 0)``: the CNN alone) or the
    stacked fusion, whichever :func:`choose_fusion` picks; the chosen rule is then refitted on every row.
    """
    cnn_probs = np.asarray(cnn_probs, dtype=np.float64)
    value_probs = np.asarray(value_probs, dtype=np.float64)
    answers = np.asarray(answers, dtype=bool)
    targets = np.asarray(targets, dtype=np.int64)
    sources_arr = np.asarray(sources, dtype=object) if sources is not None else None
    groups_arr = np.asarray(groups, dtype=object) if groups is not None else sources_arr
    if not (len(cnn_probs) == len(value_probs) == len(answers) == len(targets)) or any(
        a is not None and len(a) != len(targets) for a in (sources_arr, groups_arr)
    ):
        raise ValueError(
            "cnn_probs, value_probs, answers, targets, sources and groups need one row per sample"
        )
    if len(targets) == 0:
        raise ValueError("no held-out predictions to fit a calibration on")
    log_cnn = log_probabilities(cnn_probs)
    cnn_scale = _best_scale(log_cnn, targets, _row_weights(targets, sources_arr))
    rows = np.flatnonzero(answers)
    values_scale, cnn_weight, values_weight, stack, choice = 1.0, cnn_scale, 0.0, None, {}
    if len(rows):
        log_values = log_probabilities(value_probs[rows])
        row_sources = sources_arr[rows] if sources_arr is not None else None
        weights = _row_weights(targets[rows], row_sources)
        values_scale = _best_scale(log_values, targets[rows], weights)
        cnn_weight, values_weight = _fit_product(log_cnn[rows], log_values, targets[rows], weights, cnn_scale)
        ridge, scores = choose_fusion(
            log_cnn[rows],
            log_values,
            targets[rows],
            row_sources,
            groups_arr[rows] if groups_arr is not None else np.zeros(len(rows)),
        )
        if ridge is not None:
            stack = fit_stack(
                stack_features(log_cnn[rows], log_values), targets[rows], weights, ridge
            ).tolist()
        choice = {"fusion": "product" if ridge is None else "stacked", "ridge": ridge, "choice_brier": scores}
    info = {
        "samples": len(targets),
        "with_values": len(rows),
        "weighting": "classes alike, sources alike within a class"
        if sources is not None
        else "classes alike",
        **choice,
        **dict(fitted_on or {}),
    }
    return FusionCalibration(cnn_scale, values_scale, cnn_weight, values_weight, info, stack)


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
