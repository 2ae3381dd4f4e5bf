"""Image (PNG/JPEG/PGM) and volume (NIfTI, npy) readers on files built here, plus the real X-ray files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from modality.paths import shared_data_root
from modality.readers import read_headers, read_slices
from modality.records import InputItem, RejectedInput


def _image_item(path: Path, **fields: object) -> InputItem:
    return InputItem(path=str(path), dataset="built", kind="image", **fields)


def _rejection(item: InputItem, **kwargs: object) -> RejectedInput:
    with pytest.raises(RejectedInput) as caught:
        read_headers(item)
        read_slices(item, **kwargs)
    return caught.value


# ---------------------------------------------------------------- images


def test_8_bit_png_keeps_values_and_range(tmp_path: Path) -> None:
    pixels = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    Image.fromarray(pixels, mode="L").save(tmp_path / "a.png")
    (decoded,) = read_slices(_image_item(tmp_path / "a.png"))
    np.testing.assert_array_equal(decoded.pixels, pixels)
    assert decoded.pixels.dtype == np.float32
    assert decoded.value_range == (0.0, 255.0)
    assert decoded.meta["original_shape"] == [12, 20] and decoded.meta["format"] == "PNG"


def test_16_bit_png_and_pgm_use_the_16_bit_range(tmp_path: Path) -> None:
    pixels = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    Image.fromarray(pixels).save(tmp_path / "deep.pgm")
    for name in ("deep.png", "deep.pgm"):
        (decoded,) = read_slices(_image_item(tmp_path / name))
        np.testing.assert_array_equal(decoded.pixels, pixels)
        assert decoded.value_range == (0.0, 65535.0)
        assert decoded.meta["bits_stored"] == 16


def test_grey_stored_as_rgb_is_grey_under_both_policies(tmp_path: Path) -> None:
    grey = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "grey_rgb.png")
    for colour in ("grey", "reject"):
        np.testing.assert_array_equal(
            read_slices(_image_item(tmp_path / "grey_rgb.png"), colour=colour)[0].pixels, grey
        )


def test_colour_becomes_luma_or_is_rejected(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "red.png")
    item = _image_item(tmp_path / "red.png")
    assert read_slices(item)[0].pixels[0, 0] == pytest.approx(0.299 * 200)
    assert _rejection(item, colour="reject").reason == "colour image rejected"


def test_palette_and_grey_alpha_modes(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey, mode="L").convert("P").save(tmp_path / "pal.png")
    Image.fromarray(grey, mode="L").convert("LA").save(tmp_path / "la.png")
    for name in ("pal.png", "la.png"):
        np.testing.assert_array_equal(
            read_slices(_image_item(tmp_path / name), colour="reject")[0].pixels, grey
        )


def test_jpeg_is_read(tmp_path: Path) -> None:
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))
    Image.fromarray(grey).save(tmp_path / "x.jpg", quality=95)
    (decoded,) = read_slices(_image_item(tmp_path / "x.jpg"))
    assert np.abs(decoded.pixels - grey).max() < 8  # lossy, but the same picture


def test_image_headers_come_from_the_item_with_fallbacks(tmp_path: Path) -> None:
    Image.new("L", (5, 4)).save(tmp_path / "case42.png")
    (bare,) = read_headers(_image_item(tmp_path / "case42.png"))
    assert (bare.index, bare.n_slices, bare.patient_id, bare.series_uid) == (
        0,
        1,
        "case42",
        str(tmp_path / "case42.png"),
    )
    (stated,) = read_headers(
        _image_item(
            tmp_path / "case42.png", modality="CR", body_part="CHEST", patient_id="p7", series_uid="s1"
        )
    )
    assert (stated.modality, stated.body_part_raw, stated.patient_id, stated.series_uid) == (
        "CR",
        "CHEST",
        "p7",
        "s1",
    )


def test_broken_images_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"this is not a png" * 10)
    assert _rejection(_image_item(tmp_path / "junk.png")).reason == "not an image file"
    Image.fromarray(np.zeros((200, 200), np.uint8) + 7).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert _rejection(_image_item(tmp_path / "cut.png")).reason == "truncated or malformed file"
    assert _rejection(_image_item(tmp_path / "gone.png")).reason == "unreadable file"
    with pytest.raises(RejectedInput, match="no such frame"):
        read_slices(_image_item(tmp_path / "whole.png"), [1])


def test_real_xray_images_all_decode() -> None:
    root = shared_data_root()
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"shared real data not found at {root}")
    import pandas as pd

    manifest = pd.read_csv(root / "manifest.csv")
    xray = manifest[manifest.kind == "xray"]
    assert len(xray) == 73
    for path in xray.path:
        (decoded,) = read_slices(_image_item(root / path))
        assert decoded.pixels.ndim == 2 and decoded.pixels.max() > decoded.pixels.min()


# ---------------------------------------------------------------- volumes


def _nifti_item(path: Path, axis: int = 2) -> InputItem:
    return InputItem(path=str(path), dataset="built", kind="nifti", slice_axis=axis)


def _marked_volume() -> np.ndarray:
    """10 x 12 x 8 (x right, y anterior, z superior) with one bright voxel right-anterior-superior."""
    volume = np.zeros((10, 12, 8), np.int16)
    volume[8, 10, 5] = 100
    return volume


def test_nifti_slices_along_each_axis_with_scaling(tmp_path: Path) -> None:
    image = nib.Nifti1Image(_marked_volume(), np.eye(4))
    image.header.set_slope_inter(2.0, -5.0)
    nib.save(image, tmp_path / "v.nii.gz")
    for axis, count in ((0, 10), (1, 12), (2, 8)):
        headers = read_headers(_nifti_item(tmp_path / "v.nii.gz", axis))
        assert [h.index for h in headers] == list(range(count))
        assert headers[0].patient_id == "v.nii"  # stem of v.nii.gz
    (axial,) = read_slices(_nifti_item(tmp_path / "v.nii.gz"), [5])
    assert axial.pixels.shape == (12, 10)
    assert axial.pixels.max() == 100 * 2.0 - 5.0 and axial.pixels.min() == -5.0
    assert axial.value_range == (-32768 * 2.0 - 5.0, 32767 * 2.0 - 5.0)
    assert axial.meta["rescale_slope"] == 2.0
    assert axial.meta["stored_peak"] == 100  # the stored integers, the scaling undone


def test_a_compressed_volume_is_inflated_once_and_gives_the_uncompressed_slices(
    tmp_path, monkeypatch
) -> None:
    """nibabel reopens and re-inflates a .nii.gz from its start for every slice (quadratic in the slice count:
    24 s for a 512x512x120 CT, benchmarks/volumes.py); the reader inflates the first volume once. Same values, scaling and meta
    as the uncompressed file, for a scaled 4-D series stored in a permuted, flipped order."""
    rng = np.random.default_rng(5)
    series = rng.integers(-1000, 3000, size=(9, 7, 12, 3)).astype(np.int16)
    affine = np.array([[0, 0, -1.5, 9], [0, 0.8, 0, -4], [-2.0, 0, 0, 30], [0, 0, 0, 1.0]])
    for name in ("s.nii", "s.nii.gz"):
        image = nib.Nifti1Image(series, affine)
        image.header.set_slope_inter(0.25, -7.0)
        nib.save(image, tmp_path / name)
    opened: list[str] = []
    original = nib.openers.Opener.__init__

    def counting(self, fileish, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(fileish, (str, Path)) and str(fileish).endswith("s.nii.gz"):
            opened.append(str(fileish))
        original(self, fileish, *args, **kwargs)

    monkeypatch.setattr(nib.openers.Opener, "__init__", counting)
    for axis in (0, 1, 2):
        plain = read_slices(_nifti_item(tmp_path / "s.nii", axis))
        opened.clear()
        read_slices(_nifti_item(tmp_path / "s.nii.gz", axis), [0])
        one = len(opened)
        opened.clear()
        packed = read_slices(_nifti_item(tmp_path / "s.nii.gz", axis))
        assert len(opened) == one, f"{len(opened)} opens for {len(packed)} slices, {one} for one"
        assert len(packed) == len(plain) == (12, 7, 9)[axis]
        for a, b in zip(plain, packed, strict=True):
            np.testing.assert_array_equal(a.pixels, b.pixels)
            assert (a.value_range, a.meta) == (b.value_range, b.meta)


def test_a_compressed_volume_cut_short_is_rejected_as_malformed(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.ones((40, 40, 30), np.int16), np.eye(4)), tmp_path / "whole.nii.gz")
    data = (tmp_path / "whole.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    assert _rejection(_nifti_item(tmp_path / "cut.nii.gz")).reason == "truncated or malformed file"


def test_nifti_slices_look_the_same_whatever_the_stored_voxel_order(tmp_path: Path) -> None:
    ras = _marked_volume()
    nib.save(nib.Nifti1Image(ras, np.eye(4)), tmp_path / "ras.nii")
    # Same anatomy stored LPS-style and transposed to (z, y, x).
    lps = ras[::-1, ::-1, :].transpose(2, 1, 0)
    affine = np.array([[0, 0, -1, 9], [0, -1, 0, 11], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(lps), affine), tmp_path / "lps.nii")
    for name in ("ras.nii", "lps.nii"):
        (axial,) = read_slices(_nifti_item(tmp_path / name), [5])
        # Viewer layout: anterior at the top (row 12-1-10 = 1), patient's right on the left (col 10-1-8 = 1).
        assert [tuple(p) for p in np.argwhere(axial.pixels == 100)] == [(1, 1)]


def test_nifti_4d_uses_the_first_volume_and_float_range(tmp_path: Path) -> None:
    series = np.zeros((4, 4, 3, 2), np.float32)
    series[..., 0] = 1.5
    series[..., 1] = 9.0
    nib.save(nib.Nifti1Image(series, np.eye(4)), tmp_path / "t.nii")
    slices = read_slices(_nifti_item(tmp_path / "t.nii"))
    assert len(slices) == 3 and all(float(s.pixels.max()) == 1.5 for s in slices)
    assert all(s.meta["stored_peak"] is None for s in slices)  # float data: no stored integers


def test_broken_volumes_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "junk.nii").write_bytes(b"\x00" * 20)
    assert _rejection(_nifti_item(tmp_path / "junk.nii")).reason in {
        "not a volume file",
        "truncated or malformed file",
    }
    nib.save(nib.Nifti1Image(np.ones((30, 30, 30), np.float32), np.eye(4)), tmp_path / "whole.nii")
    data = (tmp_path / "whole.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 3])
    assert _rejection(_nifti_item(tmp_path / "cut.nii")).reason == "truncated or malformed file"
    with pytest.raises(RejectedInput, match="no such frame"):
        read_slices(_nifti_item(tmp_path / "whole.nii"), [30])


def test_npy_stack_and_single_image(tmp_path: Path) -> None:
    stack = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    np.save(tmp_path / "stack.npy", stack)
    item = InputItem(path=str(tmp_path / "stack.npy"), dataset="built", kind="npy", slice_axis=0)
    assert len(read_headers(item)) == 2
    (second,) = read_slices(item, [1])
    np.testing.assert_array_equal(second.pixels, stack[1])
    assert second.value_range == (-32768.0, 32767.0)
    np.save(tmp_path / "flat.npy", np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4))
    flat = InputItem(path=str(tmp_path / "flat.npy"), dataset="built", kind="npy")
    (only,) = read_slices(flat)
    assert len(read_headers(flat)) == 1 and only.value_range == (0.0, 1.0)


def test_npy_never_unpickles(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    item = InputItem(path=str(tmp_path / "objects.npy"), dataset="built", kind="npy")
    assert _rejection(item).reason == "not a volume file"
    np.save(tmp_path / "line.npy", np.zeros(5))
    assert _rejection(InputItem(path=str(tmp_path / "line.npy"), dataset="b", kind="npy")).reason == (
        "unsupported array shape"
    )


def test_unknown_kind_is_rejected(tmp_path: Path) -> None:
    item = InputItem(path=str(tmp_path / "a.mha"), dataset="built", kind="metaimage")
    assert _rejection(item).reason == "unsupported file kind"
