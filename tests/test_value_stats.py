"""Header-free value statistics: hand-built slices in known units give the features they must."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modality.intensity.value_stats import SAMPLE_LIMIT, VALUE_FEATURES, value_features


def test_ct_like_slice_in_hounsfield_units() -> None:
    ct = np.full((64, 64), -1000.0, dtype=np.float32)  # air
    ct[16:48, 16:48] = 40.0  # soft tissue
    features = dict(zip(VALUE_FEATURES, value_features(ct), strict=True))
    assert features["fraction_at_or_below_-500"] == pytest.approx(0.75)
    assert features["fraction_within_150_of_0"] == pytest.approx(0.25)
    assert features["asinh_p0.5"] == pytest.approx(math.asinh(-10.0))
    assert features["asinh_max"] == pytest.approx(math.asinh(0.4))
    assert features["fraction_non_integer"] == 0.0
    assert features["log2_rows"] == features["log2_columns"] == 6.0


def test_pet_like_slice_has_non_integer_values_and_a_long_tail() -> None:
    rng = np.random.default_rng(0)
    pet = rng.gamma(2.0, 500.0, size=(128, 128)).astype(np.float32)  # activity after a float slope
    features = dict(zip(VALUE_FEATURES, value_features(pet), strict=True))
    assert features["fraction_at_or_below_-500"] == 0.0
    assert features["fraction_non_integer"] > 0.99
    assert features["asinh_p99.5"] > features["asinh_p50"] > features["asinh_p5"]


def test_large_slices_are_subsampled_on_a_grid_and_non_finite_values_ignored() -> None:
    big = np.zeros((1024, 1024), dtype=np.float32)
    big[::2, :] = 1000.0  # even rows bright: a stride-16 grid sees only even rows
    assert big.size > SAMPLE_LIMIT
    features = dict(zip(VALUE_FEATURES, value_features(big), strict=True))
    assert features["asinh_p0.5"] == pytest.approx(math.asinh(10.0))
    assert features["log2_rows"] == 10.0  # the slice's own size, not the subsample's
    with_nan = np.array([[np.nan, 1.0], [2.0, np.inf]], dtype=np.float32)
    assert value_features(with_nan)[VALUE_FEATURES.index("fraction_non_integer")] == 0.0
    with pytest.raises(ValueError, match="finite"):
        value_features(np.full((4, 4), np.nan))


def test_smaller_export_copies_lower_only_the_matrix_size() -> None:
    from modality.intensity.value_stats import SMALLER_EXPORT_STEPS, with_smaller_exports

    big = value_features(np.zeros((2048, 1024), dtype=np.float32) + np.arange(1024, dtype=np.float32))
    tiny = value_features(np.arange(16 * 16, dtype=np.float32).reshape(16, 16))
    features, labels, origin = with_smaller_exports(np.array([big, tiny]), np.array([3, 1]))
    assert len(features) == 2 * (1 + len(SMALLER_EXPORT_STEPS)) and labels.tolist() == [3, 1] * 4
    assert origin.tolist() == [0, 1] * 4  # each copy says which input row it came from
    rows, columns = VALUE_FEATURES.index("log2_rows"), VALUE_FEATURES.index("log2_columns")
    assert features[0::2, rows].tolist() == [11.0, 10.0, 9.0, 8.0]  # 2048 rows, then 2x, 4x, 8x smaller
    assert features[0::2, columns].tolist() == [10.0, 9.0, 8.0, 7.0]
    assert features[1::2, rows].tolist() == [4.0] * 4  # 16 px is already below the 32-px floor: unchanged
    others = [i for i in range(len(VALUE_FEATURES)) if i not in (rows, columns)]
    assert (
        features[:, others] == np.repeat(features[:2, others][None], 4, axis=0).reshape(-1, len(others))
    ).all()


def test_float32_slices_give_the_features_of_their_float64_values() -> None:
    """float32 pixels are sorted as they are; every feature equals the one of the same values widened to
    float64 (non-integer fractions near the 1e-3 threshold, infinities and NaN included)."""
    rng = np.random.default_rng(5)
    threshold = np.float32(1e-3)  # the float32 nearest 1e-3 lies above it: the comparison must stay float64
    for trial in range(200):
        shape = [(64, 64), (512, 512), (7, 300), (1, 1)][trial % 4]
        values = np.round(rng.normal(0, 300, shape)) + rng.choice([0.0, float(threshold), 0.5, 1e-4], shape)
        if trial % 5 == 0:
            values.flat[:: max(1, values.size // 7)] = rng.choice([np.inf, -np.inf, np.nan, -500.0, 150.0])
        pixels = values.astype(np.float32)
        if not np.isfinite(pixels).any():
            continue
        assert value_features(pixels) == value_features(pixels.astype(np.float64))


def test_stored_peak_marks_pet_scaled_to_the_int16_range_and_nothing_else() -> None:
    """PET: non-integer activity from stored integers filling the signed 16-bit range; MR stored high but
    integer (no fractional slope), and MR with a fractional slope but 12-bit integers, do not match."""
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 32768, size=(64, 64))
    stored[0, 0] = 32767
    pet = (stored * 0.0173).astype(np.float32)
    mr_high = rng.integers(0, 65536, size=(64, 64)).astype(np.float32)  # integers, 16 bits
    mr_slope = (rng.integers(0, 4096, size=(64, 64)) * 1.082).astype(np.float32)  # a Philips-like slope
    signature, peak = (
        VALUE_FEATURES.index("non_integer_at_int16_peak"),
        VALUE_FEATURES.index("log2_stored_peak"),
    )
    features = value_features(pet, 32767)
    assert len(features) == len(VALUE_FEATURES)
    assert features[peak] == pytest.approx(15.0, abs=1e-4)
    assert features[signature] == features[VALUE_FEATURES.index("fraction_non_integer")] > 0.9
    assert value_features(mr_high, 65535)[signature] == 0.0
    assert value_features(mr_slope, 4095)[signature] == 0.0
    assert value_features(mr_slope, 4095)[peak] == pytest.approx(12.0, abs=1e-3)
    without = value_features(pet)  # float data: no stored integers
    assert without[peak] == 0.0 and without[signature] == 0.0
    assert without[:peak] == features[:peak]  # the other statistics do not depend on it


def test_unit_rescaled_copies_move_only_the_unit_columns_of_unit_free_classes() -> None:
    from modality.intensity.value_stats import UNIT_COPIES, UNIT_DECADES, with_unit_rescaled

    rng = np.random.default_rng(2)
    ct = value_features(rng.normal(0, 300, (64, 64)).round().astype(np.float32), 2000)
    pet = value_features(rng.gamma(2.0, 500.0, (64, 64)).astype(np.float32), 32767)
    features, labels, origin = with_unit_rescaled(np.array([ct, pet]), np.array([0, 2]), unit_free=[1, 2])
    assert len(features) == 2 + UNIT_COPIES and labels.tolist() == [0, 2] + [2] * UNIT_COPIES
    assert origin.tolist() == [0, 1] + [1] * UNIT_COPIES
    units = [i for i, name in enumerate(VALUE_FEATURES) if name.startswith("asinh_")]
    others = [i for i in range(len(VALUE_FEATURES)) if i not in units]
    assert (features[2:, others] == features[1, others]).all()  # only the unit columns move
    original = 100 * np.sinh(features[1, units].astype(np.float64))
    for copy in features[2:]:
        ratio = 100 * np.sinh(copy[units].astype(np.float64)) / original
        assert np.allclose(ratio, ratio[-1], rtol=1e-3)  # one factor per copy, every column alike
        assert 10**-UNIT_DECADES <= ratio[-1] <= 10**UNIT_DECADES
    again, _, _ = with_unit_rescaled(np.array([ct, pet]), np.array([0, 2]), unit_free=[1, 2])
    assert (again == features).all()  # deterministic
    untouched, _, origin = with_unit_rescaled(np.array([ct]), np.array([0]), unit_free=[1, 2])
    assert len(untouched) == 1 and origin.tolist() == [0]


def test_radiograph_exports_become_detector_integers_at_their_own_matrix() -> None:
    from modality.intensity.value_stats import DETECTOR_PEAK_BITS, as_detector_radiographs

    rng = np.random.default_rng(3)
    export = value_features(np.clip(rng.normal(120, 50, (1024, 800)), 0, 255).round(), 255)
    dark = value_features(np.clip(rng.normal(20, 10, (512, 512)), 0, 255).round(), 255)
    rows = np.array([export, dark], dtype=np.float32)
    copies = as_detector_radiographs(rows, seed=0)
    column = VALUE_FEATURES.index
    units = [column(n) for n in VALUE_FEATURES if n.startswith("asinh_")]
    for row, copy in zip(rows, copies, strict=True):
        display = 100 * np.sinh(row[units].astype(np.float64))
        scaled = 100 * np.sinh(copy[units].astype(np.float64))
        assert (scaled[display == 0] == 0).all()  # a black tail stays black
        ratio = scaled[display > 0] / display[display > 0]
        assert np.allclose(ratio, ratio[-1], rtol=1e-3) and ratio[-1] > 1  # one gain, every percentile alike
        low, high = DETECTOR_PEAK_BITS
        assert low - 0.01 <= copy[column("log2_stored_peak")] <= high + 0.01  # a 10-12 bit detector's peak
        assert copy[column("fraction_non_integer")] == 0 and copy[column("non_integer_at_int16_peak")] == 0
        assert copy[column("fraction_at_or_below_-500")] == 0
        assert copy[column("log2_rows")] == row[column("log2_rows")]  # a DICOM radiograph keeps its matrix
        assert copy[column("log2_columns")] == row[column("log2_columns")]
        # fewer values near 0 once the display values are multiplied up to detector integers
        assert copy[column("fraction_within_150_of_0")] < row[column("fraction_within_150_of_0")]
    assert (as_detector_radiographs(rows, seed=0) == copies).all()  # deterministic for a seed
    assert not (as_detector_radiographs(rows, seed=1) == copies).all()
    assert as_detector_radiographs(rows[:0]).shape == (0, len(VALUE_FEATURES))
