"""Export simulation (``data.augment.export``, ``simulate_export``): DICOM-derived slices turned into what
prepare stores from an 8-bit PNG/JPEG export of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modality.data.batch_transforms import augment_batch, export_images, simulate_export

SIZE = 96


def phantom(batch: int = 8, seed: int = 0) -> torch.Tensor:
    """Float (B, 1, SIZE, SIZE) in [0, 1]: a bright disc with structure on a dark background, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, SIZE)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    disc = (1 - (xx**2 + yy**2) / 0.7).clamp(0, 1)
    stripes = 0.2 * torch.sin(6 * xx) * (disc > 0)
    base = (disc * 0.8 + stripes).clamp(0, 1)[None, None]
    levels = torch.rand(batch, 1, 1, 1, generator=generator) * 0.5 + 0.5
    noise = torch.randn(batch, 1, SIZE, SIZE, generator=generator) * 0.02
    return (base * levels + noise).clamp(0, 1)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def test_output_is_a_stored_uint8_image_in_range_with_the_input_shape() -> None:
    x = phantom()
    out = export_images(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out * 255, (out * 255).round(), atol=1e-4)  # uint8 levels, as prepare stores
    # Prepare's percentile stretch: each exported image spans the full range again.
    assert torch.all(out.amax(dim=(1, 2, 3)) > 0.99) and torch.all(out.amin(dim=(1, 2, 3)) < 0.01)


def test_the_window_clips_a_ramp() -> None:
    ramp = torch.linspace(0, 1, SIZE).expand(SIZE, SIZE)[None, None].repeat(16, 1, 1, 1)
    wide = export_images(
        ramp, torch.Generator().manual_seed(0), window_low=0.0, window_width=1.0, downscale=1.0
    )
    narrow = export_images(
        ramp, torch.Generator().manual_seed(0), window_low=0.4, window_width=0.25, downscale=1.0
    )

    def flat_share(images: torch.Tensor) -> torch.Tensor:
        return ((images <= 1 / 255) | (images >= 254 / 255)).float().mean(dim=(1, 2, 3))

    # The widest window, the ramp's 1st-99th percentile (from every 4th column), leaves it a ramp: only its
    # ends are flat, up to 9 of 96 columns; random narrower windows flatten much more.
    assert flat_share(wide).max() < 0.1
    assert flat_share(narrow).median() > 0.2


def test_windows_sit_on_the_content_so_a_narrow_bright_slice_is_not_blanked() -> None:
    bright = 0.9 + 0.1 * phantom()  # anatomy in the top tenth of the range, as in some stored MR slices
    bright[:, :, :, :20] = 0  # and a padded border
    out = export_images(bright, torch.Generator().manual_seed(4))
    assert torch.all(out.std(dim=(1, 2, 3)) > 0.1)
    inside = (slice(None), slice(None), slice(20, None))  # the anatomy, not the border
    assert min(correlation(out[i][inside], bright[i][inside]) for i in range(bright.shape[0])) > 0.5


def test_jpeg_changes_pixels_but_keeps_the_picture() -> None:
    x = phantom()
    plain = {"window_low": 0.0, "window_width": 1.0, "downscale": 1.0}
    out = export_images(x, torch.Generator().manual_seed(2), quality=(40, 40), **plain)
    best = export_images(x, torch.Generator().manual_seed(2), quality=(100, 100), **plain)
    # Same draws, only the JPEG quality differs: the compression is what changed these pixels.
    assert (out - best).abs().mean() > 2e-3
    assert min(correlation(out[i], x[i]) for i in range(x.shape[0])) > 0.97
    # Down- and up-sampling blurs but keeps the picture too.
    small = export_images(
        x, torch.Generator().manual_seed(3), window_low=0.0, window_width=1.0, downscale=3.0
    )
    assert min(correlation(small[i], x[i]) for i in range(x.shape[0])) > 0.9


def test_probability_zero_and_unchosen_images_are_untouched() -> None:
    x = phantom()
    state = torch.random.get_rng_state()
    assert torch.equal(augment_batch(x, {"export": 0.0}), x)
    assert torch.equal(torch.random.get_rng_state(), state)  # and the random stream is not consumed
    chosen = torch.tensor([True, False] * 4)
    out = export_images(x, torch.Generator().manual_seed(0), chosen=chosen)
    assert torch.equal(out[~chosen], x[~chosen]) and not torch.equal(out[chosen], x[chosen])
    assert torch.equal(export_images(x, chosen=torch.zeros(8, dtype=torch.bool)), x)


def test_augment_with_a_seeded_generator_repeats_and_exports_about_the_given_share() -> None:
    x = phantom(64)
    options = {"export": 0.5, "export_quality": [30, 95]}
    first = augment_batch(x, options, generator=torch.Generator().manual_seed(5))
    again = augment_batch(x, options, generator=torch.Generator().manual_seed(5))
    other = augment_batch(x, options, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    changed = (first != x).flatten(1).any(dim=1).float().mean()
    assert 0.3 < changed < 0.7


def test_simulate_export_is_deterministic_and_keeps_type_and_shape() -> None:
    images = (phantom(4) * 255).round().to(torch.uint8)
    out = simulate_export(images, seed=7)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, simulate_export(images, seed=7))
    assert not torch.equal(out, simulate_export(images, seed=8))
    assert not torch.equal(out, images)
    single = images[0, 0].numpy()
    as_numpy = simulate_export(single, seed=7)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.uint8 and as_numpy.shape == single.shape
    with pytest.raises(ValueError, match="uint8"):
        simulate_export(images.float(), seed=0)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="quality"):
        export_images(phantom(2), quality=(90, 30))
    with pytest.raises(ValueError, match="downscale"):
        export_images(phantom(2), downscale=0.5)
