"""Fitted fusion of the CNN and the value head (modality/models/fusion.py)."""

from __future__ import annotations

import numpy as np
import pytest

from modality.models.fusion import (
    FusionCalibration,
    _balanced_nll,
    _row_weights,
    choose_fusion,
    decisions,
    fit_fusion,
    fit_stack,
    has_physical_units,
    scorable_rows,
    stack_arrays,
    stack_features,
    stack_logits,
)
from modality.models.fusion import (
    log_probabilities as _log,
)


def test_physical_units_by_source_kind() -> None:
    assert has_physical_units({"transfer_syntax": "1.2.840.10008.1.2.1", "photometric": "MONOCHROME2"})
    assert not has_physical_units(
        {"transfer_syntax": "1.2.840.10008.1.2.4.50", "photometric": "YBR_FULL_422"}
    )
    assert not has_physical_units({"transfer_syntax": "1.2.840.10008.1.2", "photometric": "RGB"})
    assert has_physical_units({"format": "nifti", "transfer_syntax": ""})
    assert not has_physical_units({"format": "PNG", "transfer_syntax": ""})
    assert not has_physical_units({"format": "JPEG", "transfer_syntax": ""})
    # stored shard JSON has no format: the source path's suffix decides
    assert has_physical_units({"transfer_syntax": "", "source_path": "/d/smwAD1.img"})
    assert not has_physical_units({"transfer_syntax": "", "source_path": "/d/chest.jpg"})


def test_volumes_stored_as_8bit_integers_have_no_physical_units() -> None:
    """A uint8/int8 volume holds display values (no modality's unit fits in 8 bits); DICOM keeps its LUT's units."""
    for fmt in ("nifti", "metaimage", "nrrd", "npy"):
        assert not has_physical_units({"format": fmt, "transfer_syntax": "", "dtype": "uint8"}), fmt
        assert not has_physical_units({"format": fmt, "transfer_syntax": "", "dtype": "int8"}), fmt
        for wide in ("int16", ">i2", "uint16", "float32", "float64", "int32"):
            assert has_physical_units({"format": fmt, "transfer_syntax": "", "dtype": wide}), (fmt, wide)
    assert not has_physical_units({"transfer_syntax": "", "source_path": "/d/t1.nii.gz", "dtype": "uint8"})
    assert has_physical_units({"transfer_syntax": "", "source_path": "/d/t1.nii.gz", "dtype": "int16"})
    assert has_physical_units(
        {"transfer_syntax": "1.2.840.10008.1.2.1", "dtype": "uint8"}
    )  # DICOM: LUT units
    assert has_physical_units({"format": "nifti", "transfer_syntax": "", "dtype": "not a dtype"})


def _toy(seed: int = 0, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A CNN that is right 80% of the time but always 99% sure, and a value head that is useless
    (confidently wrong on half the rows): the fit must temper the CNN and drop the head."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 4, n)
    guess = np.where(rng.random(n) < 0.8, targets, (targets + 1) % 4)
    cnn = np.full((n, 4), 0.01 / 3)
    cnn[np.arange(n), guess] = 0.99
    wrong = (targets + rng.integers(1, 4, n)) % 4
    value_guess = np.where(rng.random(n) < 0.5, targets, wrong)
    values = np.full((n, 4), 0.001 / 3)
    values[np.arange(n), value_guess] = 0.999
    answers = rng.random(n) < 0.7
    return cnn, values, answers, targets


def test_fit_tempers_an_overconfident_cnn_and_drops_a_useless_head() -> None:
    cnn, values, answers, targets = _toy()
    fitted = fit_fusion(cnn, values, answers, targets, {"source": "toy"})
    assert fitted.cnn_scale < 0.5
    assert fitted.values_weight < fitted.cnn_weight
    fused = fitted.fuse(cnn, values, answers)
    # never worse than the calibrated CNN alone on the rows it was fitted on
    assert (
        _balanced_nll(np.log(fused), targets) <= _balanced_nll(fitted.cnn_scale * _log(cnn), targets) + 1e-9
    )
    assert fitted.fitted_on == {
        "samples": 400,
        "with_values": int(answers.sum()),
        "weighting": "classes alike",
        "fusion": "product",  # one group: nothing to cross-validate a stack on
        "ridge": None,
        "choice_brier": {},
        "source": "toy",
    }


def test_fit_uses_a_good_value_head() -> None:
    cnn, _, answers, targets = _toy(1)
    values = np.full_like(cnn, 0.05 / 3)
    values[np.arange(len(targets)), targets] = 0.95  # always right
    fitted = fit_fusion(cnn, values, answers, targets)
    assert fitted.values_weight > 0
    fused = fitted.fuse(cnn, values, answers).argmax(1)
    assert (fused[answers] == targets[answers]).mean() > 0.99
    # rows where the head abstained keep the CNN's answer
    assert (fused[~answers] == cnn[~answers].argmax(1)).all()


def test_decisions_and_round_trip(tmp_path) -> None:
    cnn, values, answers, targets = _toy(2)
    fitted = fit_fusion(cnn, values, answers, targets)
    loaded = FusionCalibration.load(fitted.save(tmp_path / "calibration.json"))
    assert loaded == fitted
    out = decisions(loaded, cnn, values, answers)
    assert np.isnan(out["values"][~answers]).all() and not np.isnan(out["values"][answers]).any()
    np.testing.assert_allclose(out["fused"].sum(1), 1.0)
    (tmp_path / "bad.json").write_text('{"cnn_scale": -1}')
    with pytest.raises(ValueError, match="cnn_scale"):
        FusionCalibration.load(tmp_path / "bad.json")


def test_stack_arrays_marks_abstentions() -> None:
    arr, mask = stack_arrays([[0.1, 0.9], None, [0.5, 0.5]], 2)
    assert mask.tolist() == [True, False, True]
    assert arr[1].tolist() == [0.5, 0.5]


def test_every_source_weighs_alike_within_its_class() -> None:
    """One large source where only the value head is right, four small ones where only the CNN is: weighted
    by rows the head wins; weighted by source the CNN does."""
    rows, sources, targets = [], [], []
    for cls in range(4):
        for source, n, cnn_right in (("big", 400, False), *((f"s{k}", 20, True) for k in range(4))):
            for _ in range(n):
                rows.append(cnn_right)
                sources.append(f"{source}-{cls}" if source != "big" else "big")
                targets.append(cls)
    targets = np.asarray(targets)
    right = np.asarray(rows)
    wrong = (targets + 1) % 4
    cnn = np.full((len(targets), 4), 0.02)
    cnn[np.arange(len(targets)), np.where(right, targets, wrong)] = 0.94
    values = np.full((len(targets), 4), 0.02)
    values[np.arange(len(targets)), np.where(right, wrong, targets)] = 0.94
    answers = np.ones(len(targets), dtype=bool)
    by_rows = fit_fusion(cnn, values, answers, targets)
    by_source = fit_fusion(cnn, values, answers, targets, sources=sources)
    assert by_rows.values_weight > by_rows.cnn_weight
    assert by_source.cnn_weight > by_source.values_weight
    assert by_source.fitted_on["weighting"] == "classes alike, sources alike within a class"


def test_unknown_thresholds_round_trip_and_bad_values_are_refused(tmp_path) -> None:
    import json

    import pytest

    from modality.models.fusion import FusionCalibration

    saved = FusionCalibration(unknown_below_slice=0.7, unknown_below_series=0.8, unknown_target_accuracy=0.95)
    loaded = FusionCalibration.load(saved.save(tmp_path / "calibration.json"))
    assert (loaded.unknown_below_slice, loaded.unknown_below_series, loaded.unknown_target_accuracy) == (
        0.7,
        0.8,
        0.95,
    )
    assert (
        FusionCalibration.load(FusionCalibration().save(tmp_path / "plain.json")).unknown_below_series is None
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"unknown_below_series": "high"}))
    with pytest.raises(ValueError, match="unknown_below_series"):
        FusionCalibration.load(bad)
    # the confidence maps crossval fits travel with the thresholds (issue 19)
    mapped = FusionCalibration(
        series_confidence={"slope": 0.5, "count_slope": 0.8, "intercept": 1.0, "answers": 9}
    )
    reloaded = FusionCalibration.load(mapped.save(tmp_path / "mapped.json"))
    assert reloaded.series_map().count_slope == 0.8 and reloaded.slice_map().slope == 1.0
    bad.write_text(json.dumps({"slice_confidence": {"slope": "steep"}}))
    with pytest.raises(ValueError, match="slice_confidence"):
        FusionCalibration.load(bad)


def _class_dependent(seed: int, sources: int) -> tuple[np.ndarray, ...]:
    """Heads whose reliability depends on the class, as on the real corpus: the value head is always right
    on PET (2) but calls every X-ray (3) MR; the CNN is right on X-ray and MR but calls most PET MR."""
    rng = np.random.default_rng(seed)
    targets = np.tile(np.repeat(np.arange(4), 30), sources)
    groups = np.repeat(np.arange(sources), 120)
    n = len(targets)
    cnn_guess = np.where(rng.random(n) < 0.85, targets, rng.integers(0, 4, n))
    cnn_guess[(targets == 2) & (rng.random(n) < 0.7)] = 1
    value_guess = np.where(rng.random(n) < 0.9, targets, rng.integers(0, 4, n))
    value_guess[targets == 2] = 2
    value_guess[targets == 3] = 1
    cnn = np.full((n, 4), 0.1 / 3)
    cnn[np.arange(n), cnn_guess] = 0.9
    values = np.full((n, 4), 0.02 / 3)
    values[np.arange(n), value_guess] = 0.98
    return cnn, values, np.ones(n, dtype=bool), targets, groups


def _balanced_accuracy(predicted: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean([np.mean(predicted[targets == c] == c) for c in np.unique(targets)]))


def test_the_stack_learns_which_answers_of_each_head_to_trust() -> None:
    cnn, values, answers, targets, groups = _class_dependent(0, 6)
    fitted = fit_fusion(cnn, values, answers, targets, sources=groups.astype(str), groups=groups)
    assert fitted.fitted_on["fusion"] == "stacked" and fitted.stack_weights is not None
    assert fitted.fitted_on["choice_brier"]["product"] > min(fitted.fitted_on["choice_brier"].values())
    product = FusionCalibration(
        fitted.cnn_scale, fitted.values_scale, fitted.cnn_weight, fitted.values_weight
    )
    # judged on new sources drawn the same way: the stack beats the best single-weight product
    cnn2, values2, answers2, targets2, _ = _class_dependent(1, 4)
    stacked = _balanced_accuracy(fitted.fuse(cnn2, values2, answers2).argmax(1), targets2)
    plain = _balanced_accuracy(product.fuse(cnn2, values2, answers2).argmax(1), targets2)
    assert stacked > plain + 0.1, (stacked, plain)
    theta = np.asarray(fitted.stack_weights).reshape(3, 4)  # rows: CNN, value head, offset; columns: class
    assert theta[1, 2] > theta[1, 1]  # the value head's "PET" counts more than its "MR"
    assert theta[0, 1] > 0 and theta[0, 3] > 0  # the CNN still decides MR vs X-ray


def test_fit_stack_reaches_the_minimum() -> None:
    """Newton's answer is the penalised optimum: the gradient vanishes there."""
    cnn, values, _, targets, groups = _class_dependent(2, 3)
    design = stack_features(_log(cnn), _log(values))
    weights = _row_weights(targets, groups.astype(str))
    theta = fit_stack(design, targets, weights, ridge=0.5)
    p = np.exp(stack_logits(design, theta))
    p /= p.sum(axis=1, keepdims=True)
    residual = p - np.eye(4)[targets]
    gradient = np.einsum("i,icp->p", weights, residual[:, :, None] * design) + 0.5 * theta
    assert np.abs(gradient).max() < 1e-7
    with pytest.raises(ValueError, match="ridge"):
        fit_stack(design, targets, weights, ridge=0.0)


def test_rule_choice_needs_groups_and_skips_classes_the_others_lack() -> None:
    cnn, values, _, targets, groups = _class_dependent(3, 3)
    assert choose_fusion(_log(cnn), _log(values), targets, None, np.zeros(len(targets))) == (None, {})
    # group 0 alone holds PET (class 2): its PET rows test nothing but PET's absence from the fitting rows
    keep = (targets != 2) | (groups == 0)
    scored = scorable_rows(targets[keep], groups[keep])
    assert not scored[targets[keep] == 2].any() and scored[targets[keep] != 2].all()
    assert scorable_rows(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 2])).tolist() == [True, True, True, True]
    assert scorable_rows(np.array([0, 1, 0]), np.array([0, 0, 1])).tolist() == [True, False, True]


def test_stacked_calibration_round_trips_and_bad_weights_are_refused(tmp_path) -> None:
    cnn, values, answers, targets, groups = _class_dependent(4, 4)
    fitted = fit_fusion(cnn, values, answers, targets, groups=groups)
    assert fitted.stack_weights is not None and len(fitted.stack_weights) == 12
    loaded = FusionCalibration.load(fitted.save(tmp_path / "calibration.json"))
    assert loaded == fitted
    np.testing.assert_allclose(loaded.fuse(cnn, values, answers), fitted.fuse(cnn, values, answers))
    (tmp_path / "bad.json").write_text('{"stack_weights": [1.0, 2.0]}')
    with pytest.raises(ValueError, match="stack_weights"):
        FusionCalibration.load(tmp_path / "bad.json")


def test_rows_the_float_head_answered_take_the_product_rule_not_the_stack() -> None:
    """The stack trusts the main value head's "PET" (it learned that on stored slices); the float head's
    answers go through the product rule instead, the other rows keep the stack."""
    # a stack that learned to favour PET (class 2) wherever the value head gives it some probability
    weights = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 3.0, 0.0]  # CNN, value head, offsets
    calibration = FusionCalibration(cnn_weight=1.0, values_weight=1.0, stack_weights=weights)
    cnn = np.array([[0.05, 0.8, 0.1, 0.05]] * 2)  # the CNN says MR
    values = np.array([[0.05, 0.55, 0.35, 0.05]] * 2)  # a value head that cannot quite tell MR from PET
    answers = np.array([True, True])
    stacked = calibration.fuse(cnn, values, answers)
    assert stacked.argmax(1).tolist() == [2, 2]  # the stack's trust in "PET" wins
    mixed = calibration.fuse(cnn, values, answers, product_rows=np.array([False, True]))
    np.testing.assert_allclose(mixed[0], stacked[0])
    product = cnn[1] * values[1] / np.sum(cnn[1] * values[1])
    np.testing.assert_allclose(mixed[1], product, rtol=1e-9)
    assert mixed[1].argmax() == 1
