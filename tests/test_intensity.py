"""Intensity scaling, geometry and the slice -> uint8 pipeline on hand-built arrays."""

from __future__ import annotations

import numpy as np
import pytest

from modality.intensity import (
    DtypeScaling,
    Preprocess,
    WindowScaling,
    apply_window,
    fit_to_square,
    scale_by_dtype,
    scale_minmax,
    scale_percentile,
    slice_to_uint8,
    to_uint8,
)
from modality.intensity.scaling import PercentileScaling, Scaling, percentiles
from modality.records import DecodedSlice


def _slice(pixels: np.ndarray, value_range: tuple[float, float] = (0.0, 4095.0)) -> DecodedSlice:
    return DecodedSlice(pixels=pixels.astype(np.float32), index=0, value_range=value_range, meta={})


def test_dtype_scaling_uses_the_stored_bit_range_for_signed_ct() -> None:
    # 12-bit signed CT after intercept -1024: stored range [-2048, 2047] -> [-3072, 1023] HU.
    hu = np.array([[-3072.0, -1000.0], [0.0, 1023.0]])
    out = scale_by_dtype(hu, (-3072.0, 1023.0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (hu + 3072.0) / 4095.0, rtol=1e-6)
    assert out[0, 0] == 0.0 and out[1, 1] == 1.0


def test_dtype_scaling_clips_values_outside_the_range() -> None:
    out = scale_by_dtype(np.array([-10.0, 5.0, 20.0]), (0.0, 10.0))
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0])


def test_minmax_maps_extremes_to_zero_and_one() -> None:
    out = scale_minmax(np.array([[10.0, 20.0], [30.0, 50.0]]))
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]])


@pytest.mark.parametrize(
    "fn",
    [
        scale_minmax,
        scale_percentile,
        lambda p: scale_by_dtype(p, (7.0, 7.0)),
        lambda p: apply_window(p, 7.0, 1e-9),
    ],
)
def test_constant_images_give_zeros_not_nan(fn) -> None:
    out = fn(np.full((8, 8), 7.0))
    assert out.shape == (8, 8)
    assert np.all(out == 0.0)


def test_percentile_ignores_hot_pixels() -> None:
    img = np.tile(np.linspace(0.0, 100.0, 1000), (10, 1))
    img[0, 0] = 1e6  # one burned-in text pixel
    out = scale_percentile(img, 1.0, 99.0)
    assert out[5, 500] == pytest.approx(0.5, abs=0.01)
    assert scale_minmax(img)[5, 500] < 0.001  # the failure percentile scaling avoids


def test_percentile_matches_numpy_definition() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=10_001).astype(np.float32)
    np.testing.assert_allclose(percentiles(values, 0.5, 99.5), np.percentile(values, [0.5, 99.5]), rtol=1e-5)


def test_percentile_on_mostly_background_keeps_the_little_anatomy() -> None:
    img = np.zeros((100, 100))
    img[50, 50:55] = 300.0  # 0.05% of pixels: both percentiles are 0
    out = scale_percentile(img)
    assert out[50, 52] == 1.0 and out[0, 0] == 0.0


def test_non_finite_values_become_background() -> None:
    img = np.array([[np.nan, 0.0], [50.0, 100.0], [np.inf, -np.inf]])
    for out in (scale_percentile(img, 0.0, 100.0), scale_minmax(img)):
        assert np.all(np.isfinite(out))
        assert out[0, 0] == 0.0
        assert out[1, 0] == pytest.approx(0.5)


def test_window_maps_ct_soft_tissue() -> None:
    out = apply_window(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), center=40.0, width=400.0)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="width"):
        apply_window(np.zeros(3), 40.0, 0.0)


def test_window_scaling_windows_ct_and_falls_back_to_percentile_for_mr() -> None:
    scaling = WindowScaling(windows={"CT": [40, 400]}, low=0.0, high=100.0)
    pixels = np.array([[-1000.0, 40.0], [240.0, 1000.0]])
    np.testing.assert_allclose(scaling(_slice(pixels), "CT"), [[0.0, 0.5], [1.0, 1.0]])
    np.testing.assert_allclose(scaling(_slice(pixels), "MR"), scale_minmax(pixels))
    np.testing.assert_allclose(scaling(_slice(pixels), None), scale_minmax(pixels))


def test_window_scaling_radiograph_codes_match_an_xr_window() -> None:
    scaling = WindowScaling(windows={"XR": {"center": 50, "width": 100}})
    np.testing.assert_allclose(scaling(_slice(np.array([0.0, 50.0, 100.0])), "DX"), [0.0, 0.5, 1.0])


def test_dtype_scaling_uses_the_slice_value_range() -> None:
    decoded = _slice(np.array([0.0, 2048.0]), value_range=(0.0, 4096.0))
    np.testing.assert_allclose(DtypeScaling()(decoded, "CT"), [0.0, 0.5])


def test_pad_keeps_aspect_and_centres_on_zero_background() -> None:
    out = fit_to_square(np.ones((100, 200), dtype=np.float32), 50, "pad")
    assert out.shape == (50, 50) and out.dtype == np.float32
    rows = np.flatnonzero(out[:, 25] > 0.5)
    assert (rows[0], rows[-1]) == (12, 36)  # 25 rows of image, centred
    assert out[0, 0] == 0.0 and out[-1, -1] == 0.0


def test_stretch_and_crop_fill_the_square() -> None:
    img = np.zeros((100, 200), dtype=np.float32)
    img[:, :50] = 1.0  # left quarter bright: cropped away by a centre crop
    assert fit_to_square(img, 40, "stretch")[:, :9].min() > 0.99
    cropped = fit_to_square(img, 40, "crop")
    assert cropped.shape == (40, 40) and cropped.max() == 0.0
    with pytest.raises(ValueError, match="aspect"):
        fit_to_square(img, 40, "squash")
    with pytest.raises(ValueError, match="2-D"):
        fit_to_square(np.zeros((0, 5)), 40)


def test_downscale_is_antialiased() -> None:
    # A one-pixel checkerboard must average to grey, not alias into stripes or moire.
    checker = (np.indices((512, 512)).sum(axis=0) % 2).astype(np.float32)
    out = fit_to_square(checker, 224, "stretch")
    assert abs(float(out.mean()) - 0.5) < 0.01
    assert float(out.std()) < 0.1


def test_upscale_of_a_thumbnail_is_smooth() -> None:
    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (64, 1))
    out = fit_to_square(ramp, 224, "pad")
    assert out.shape == (224, 224)
    assert len(np.unique(to_uint8(out[100]))) > 150  # bilinear, not 64 nearest-neighbour blocks


def test_to_uint8_rounds_and_clips() -> None:
    out = to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0, np.nan]))
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255, 0])
    assert out.dtype == np.uint8


def test_slice_to_uint8_composes_scaling_geometry_and_uint8() -> None:
    pixels = np.tile(np.linspace(-1000.0, 1000.0, 300), (150, 1))
    out = slice_to_uint8(_slice(pixels), "CT", Preprocess())
    assert out.shape == (224, 224) and out.dtype == np.uint8
    assert out[0, 112] == 0 and out[-1, 112] == 0  # pad rows are background
    assert out[112, 1] < 5 and out[112, -2] > 250
    windowed = slice_to_uint8(
        _slice(pixels),
        "CT",
        Preprocess(image_size=64, aspect="stretch", scaling=WindowScaling(windows={"CT": [0, 200]})),
    )
    assert windowed.shape == (64, 64)
    assert windowed[32, 0] == 0 and windowed[32, -1] == 255 and 100 < windowed[32, 32] < 155


@pytest.mark.parametrize(
    "kind", ["normal", "few_levels", "background", "descending", "spike", "zero_floor", "saturated"]
)
def test_tail_order_statistics_equal_a_full_partition(kind: str) -> None:
    """The two-tail selection is exact: the same order statistics as np.partition, ties and all (a third
    of the values tied at the low or the high end takes the path that counts the ties)."""
    from modality.intensity.scaling import _TAIL_SELECT_MIN, order_statistics

    rng = np.random.default_rng(len(kind))
    for n in (5, 4095, 4096, _TAIL_SELECT_MIN - 1, _TAIL_SELECT_MIN, 20_001, 65_536):
        values = {
            "normal": rng.normal(size=n),
            "few_levels": rng.integers(-5, 5, n).astype(float),
            "background": np.where(rng.random(n) < 0.995, -1000.0, rng.normal(0, 300, n)),
            "descending": np.sort(rng.normal(size=n))[::-1].copy(),
            "spike": np.where(rng.random(n) < 0.99, 7.0, rng.normal(size=n)),
            "zero_floor": np.where(rng.random(n) < 0.35, 0.0, rng.integers(1, 800, n)),
            "saturated": np.where(rng.random(n) < 0.35, 4095.0, rng.integers(0, 4095, n)),
        }[kind].astype(np.float32)
        wanted = (0, 1, n // 200, n // 200 + 1, n - 2 - n // 200, n - 1 - n // 200, n // 2, n - 1)
        ks = sorted({k for k in wanted if 0 <= k < n})
        full = np.partition(values, ks)
        assert order_statistics(values, ks) == {k: float(full[k]) for k in ks}


def _ct_with_scan_circle(corner: float | None) -> np.ndarray:
    """A 256x256 CT-like slice in HU with noise: air inside the scan circle, a soft-tissue body, a bone;
    ``corner`` outside the circle (-3024 or -2048 when a scanner stores it as undeclared padding; None: air
    there too)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:256, :256]
    ct = rng.normal(-1000.0, 15.0, size=(256, 256)).astype(np.float32)
    body = (yy - 128) ** 2 + (xx - 128) ** 2 < 80**2
    ct[body] = rng.normal(40.0, 15.0, size=int(body.sum()))
    ct[120:136, 120:136] = 900.0
    if corner is not None:
        ct[(yy - 128) ** 2 + (xx - 128) ** 2 > 128**2] = corner
    return ct


@pytest.mark.parametrize("corner", [-3024.0, -2048.0])
def test_padding_gap_makes_air_black_whatever_the_scanner_stores_outside_the_circle(corner: float) -> None:
    plain = scale_percentile(_ct_with_scan_circle(None), padding_gap=0.2)
    padded = _ct_with_scan_circle(corner)
    assert scale_percentile(padded)[128, 5] > 0.3  # off: air mid-grey, 1,000-2,000 HU above the plateau
    fixed = scale_percentile(padded, padding_gap=0.2)
    assert fixed[120:136, 5:15].mean() < 0.1 and fixed[0, 0] == 0.0  # air black again, the corner too
    inside = (slice(48, 208), slice(48, 208))
    # The same picture as a scanner that stores air outside the circle (the low end moves by the air noise).
    np.testing.assert_allclose(fixed[inside], plain[inside], atol=0.03)


def test_padding_gap_leaves_a_zero_background_with_small_values_above_it_alone() -> None:
    rng = np.random.default_rng(0)
    mr = np.zeros((128, 128), dtype=np.float32)
    mr[32:96, 32:96] = rng.integers(3, 900, size=(64, 64))  # 0 background, the darkest tissue 3 above it
    np.testing.assert_array_equal(scale_percentile(mr, padding_gap=0.2), scale_percentile(mr))


def test_padding_gap_keeps_a_two_level_image_visible() -> None:
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[16:48, 16:48] = 1000.0  # minimum plateau, one value far above it: no darkest pixel below p_high
    out = scale_percentile(mask, padding_gap=0.2)
    assert out.max() == 1.0 and out.min() == 0.0


def test_padding_gap_stored_form_reads_back_and_is_absent_when_off() -> None:
    assert PercentileScaling().to_dict() == {"method": "percentile", "low": 0.5, "high": 99.5}
    on = PercentileScaling(padding_gap=0.2)
    assert Scaling.from_dict(on.to_dict()) == on
    with pytest.raises(ValueError, match="padding_gap"):
        PercentileScaling(padding_gap=1.5)
