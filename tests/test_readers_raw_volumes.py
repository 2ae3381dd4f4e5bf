"""MetaImage (.mha/.mhd) and NRRD (.nrrd/.nhdr) volumes: the same slices as the NIfTI of the same voxels and
affine, whatever the encoding; hostile headers rejected with a reason before anything big is read.

The files are written here from the two formats' specifications (MetaIO: ITK positions in LPS, TransformMatrix
row i = image axis i's direction; NRRD: ``space directions`` per axis with the spacing in them), not by the
module under test, so a parser that mixed up rows and columns or LPS and RAS would fail.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from volume_files import write_metaimage, write_nrrd

from modality.models.fusion import has_physical_units
from modality.readers import read_headers, read_slices
from modality.records import InputItem, RejectedInput
from modality.sources.folders import VolumeSource, kind_of_path

#: A permuted and flipped voxel -> RAS affine: stored axes (x, y, z) run along (-S, A, -R).
AFFINE = np.array(
    [
        [0.0, 0.0, -0.8, 20.0],
        [0.0, 1.5, 0.0, -30.0],
        [-2.5, 0.0, 0.0, 45.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _volume(dtype: str = "int16") -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(-900, 1800, size=(6, 9, 11)).astype(dtype)


def _item(path: Path, axis: int = 2) -> InputItem:
    return InputItem(path=str(path), dataset="built", kind="nifti", label="CT", slice_axis=axis)


def _slices(path: Path, axis: int = 2) -> list[np.ndarray]:
    return [s.pixels for s in read_slices(_item(path, axis))]


@pytest.fixture
def reference(tmp_path: Path) -> dict[int, list[np.ndarray]]:
    """The NIfTI reader's slices of the same voxels and affine, along each canonical axis."""
    nib.save(nib.Nifti1Image(_volume(), AFFINE), tmp_path / "reference.nii")
    return {axis: _slices(tmp_path / "reference.nii", axis) for axis in (0, 1, 2)}


def _assert_same(path: Path, reference: dict[int, list[np.ndarray]]) -> None:
    for axis, expected in reference.items():
        got = _slices(path, axis)
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "name, options",
    [
        ("local.mha", {}),
        ("zlib.mha", {"compressed": True}),
        ("msb.mha", {"big_endian": True}),
        ("pair.mhd", {"detached": "pair.raw"}),
        ("skip.mhd", {"detached": "skip.raw", "header_size": 100}),
        ("tail.mhd", {"detached": "tail.raw", "header_size": -1}),
        ("zpair.mhd", {"detached": "zpair.zraw", "compressed": True}),
    ],
)
def test_metaimage_slices_equal_the_nifti_of_the_same_voxels(tmp_path, reference, name, options) -> None:
    write_metaimage(tmp_path / name, _volume(), AFFINE, **options)
    _assert_same(tmp_path / name, reference)
    (first,) = read_slices(_item(tmp_path / name), [0])
    assert first.meta["format"] == "metaimage"
    assert first.meta["dtype"] == "int16" and first.value_range == (-32768.0, 32767.0)
    assert first.meta["stored_peak"] == int(np.abs(first.pixels).max())
    assert has_physical_units(first.meta)  # HU stay HU: the value head reads them


@pytest.mark.parametrize(
    "name, options",
    [
        ("lps.nrrd", {}),
        ("ras.nrrd", {"space": "right-anterior-superior"}),
        ("gz.nrrd", {"encoding": "gzip"}),
        ("bz.nrrd", {"encoding": "bzip2", "big_endian": True}),
        ("text.nrrd", {"encoding": "ascii"}),
        ("pair.nhdr", {"detached": "pair.raw"}),
        ("zpair.nhdr", {"detached": "zpair.raw.gz", "encoding": "gzip"}),
    ],
)
def test_nrrd_slices_equal_the_nifti_of_the_same_voxels(tmp_path, reference, name, options) -> None:
    write_nrrd(tmp_path / name, _volume(), AFFINE, **options)
    _assert_same(tmp_path / name, reference)
    (first,) = read_slices(_item(tmp_path / name), [0])
    assert first.meta["format"] == "nrrd" and has_physical_units(first.meta)


@pytest.mark.parametrize("name", ["brain.mgz", "brain.mgh", "BRAIN.MGZ"])
def test_freesurfer_slices_equal_the_nifti_of_the_same_voxels(tmp_path, reference, name) -> None:
    written = tmp_path / name.lower()  # nibabel names the format by a lower-case suffix when saving
    nib.save(nib.MGHImage(_volume(), AFFINE), written)
    written.rename(tmp_path / name)
    assert kind_of_path(tmp_path / name) == "nifti"
    _assert_same(tmp_path / name, reference)
    (first,) = read_slices(_item(tmp_path / name), [0])
    assert first.meta["format"] == "mgh" and np.dtype(first.meta["dtype"]) == np.dtype(
        ">i2"
    )  # MGH: big-endian
    assert has_physical_units(first.meta)


def test_a_conformed_8bit_freesurfer_volume_has_no_physical_units(tmp_path: Path) -> None:
    """FreeSurfer's conformed T1 (uint8, normalised intensities): read, but the value head abstains."""
    nib.save(nib.MGHImage(_volume("int16").clip(0, 255).astype(np.uint8), AFFINE), tmp_path / "T1.mgz")
    slices = read_slices(_item(tmp_path / "T1.mgz"))
    assert len(slices) == len(read_headers(_item(tmp_path / "T1.mgz"))) > 0
    assert all(s.meta["dtype"] == "uint8" and not has_physical_units(s.meta) for s in slices)
    items = VolumeSource(tmp_path, dataset="built", label="MR").items()
    assert [Path(i.path).name for i in items] == ["T1.mgz"]


def test_float_and_2d_metaimage(tmp_path: Path) -> None:
    floats = (_volume().astype(np.float32) * 0.37).astype(np.float32)
    write_metaimage(tmp_path / "pet.mha", floats, AFFINE)
    nib.save(nib.Nifti1Image(floats, AFFINE), tmp_path / "pet.nii")
    for got, expected in zip(_slices(tmp_path / "pet.mha"), _slices(tmp_path / "pet.nii"), strict=True):
        np.testing.assert_array_equal(got, expected)
    (first,) = read_slices(_item(tmp_path / "pet.mha"), [0])
    assert first.meta["stored_peak"] is None  # float data: no stored integers
    plane = _volume("uint8")[:, :, 0]
    text = f"NDims = 2\nDimSize = {plane.shape[0]} {plane.shape[1]}\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    (tmp_path / "xray.mha").write_bytes(text.encode() + plane.tobytes(order="F"))
    (only,) = read_slices(_item(tmp_path / "xray.mha"))
    assert sorted(only.pixels.shape) == sorted(plane.shape) and only.pixels.sum() == plane.astype(float).sum()


def test_folders_route_the_formats_and_leave_detached_data_to_their_header(tmp_path: Path) -> None:
    write_metaimage(tmp_path / "ct.mhd", _volume(), AFFINE, detached="ct.raw")
    write_nrrd(tmp_path / "mr.nrrd", _volume(), AFFINE)
    for name in ("ct.mhd", "mr.nrrd", "a.mha", "b.nhdr"):
        assert kind_of_path(tmp_path / name) == "nifti"
    assert kind_of_path(tmp_path / "ct.raw") is None  # never offered as DICOM: read with ct.mhd
    for name in ("scan.tif", "scan.TIFF", "scan.bmp", "scan.webp"):
        assert kind_of_path(tmp_path / name) == "image"
    items = VolumeSource(tmp_path, dataset="built", label="CT").items()
    assert sorted(Path(i.path).name for i in items) == ["ct.mhd", "mr.nrrd"]
    assert all(i.kind == "nifti" for i in items)


def _reason(path: Path) -> str:
    with pytest.raises(RejectedInput) as caught:
        read_headers(_item(path))
        read_slices(_item(path))
    return caught.value.reason


def test_hostile_headers_are_rejected_with_a_reason(tmp_path: Path) -> None:
    voxels = _volume()
    # Truncated voxels, attached and detached.
    write_metaimage(tmp_path / "whole.mha", voxels, AFFINE)
    data = (tmp_path / "whole.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(data[:-10])
    assert _reason(tmp_path / "cut.mha") == "truncated or malformed file"
    write_nrrd(tmp_path / "whole.nrrd", voxels, AFFINE, encoding="gzip")
    data = (tmp_path / "whole.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(data[: len(data) - 40])
    assert _reason(tmp_path / "cut.nrrd") == "truncated or malformed file"
    # A data file outside the header's folder, or a device that would block the read.
    (tmp_path / "sub").mkdir()
    (tmp_path / "secret.raw").write_bytes(voxels.tobytes())
    for target in ("../secret.raw", "/dev/zero", str(tmp_path / "secret.raw")):
        write_metaimage(tmp_path / "sub" / "escape.mhd", voxels, AFFINE, detached="x.raw")
        text = (tmp_path / "sub" / "escape.mhd").read_text().replace("x.raw", target)
        (tmp_path / "sub" / "escape.mhd").write_text(text)
        assert _reason(tmp_path / "sub" / "escape.mhd") == "unreadable file", target
    # Multi-file series, vector voxels, unknown types: refused, not guessed.
    write_metaimage(tmp_path / "list.mhd", voxels, AFFINE, detached="LIST")
    assert _reason(tmp_path / "list.mhd") == "unsupported volume encoding"
    write_metaimage(tmp_path / "rgb.mha", voxels, AFFINE, extra="ElementNumberOfChannels = 3")
    assert _reason(tmp_path / "rgb.mha") == "unsupported array shape"
    text = (tmp_path / "whole.mha").read_bytes().replace(b"MET_SHORT", b"MET_OTHER")
    (tmp_path / "type.mha").write_bytes(text)
    assert _reason(tmp_path / "type.mha") == "unsupported volume encoding"
    # Not the format at all.
    (tmp_path / "junk.mha").write_bytes(b"\x00\xff" * 500)
    assert _reason(tmp_path / "junk.mha") == "not a volume file"
    (tmp_path / "junk.nrrd").write_bytes(b"PK\x03\x04 not nrrd\n\n" + b"\x00" * 50)
    assert _reason(tmp_path / "junk.nrrd") == "not a volume file"


def test_size_claims_are_checked_before_any_voxel_is_read(tmp_path: Path) -> None:
    # 40000 x 40000 x 4000 claimed by a few hundred bytes: over the decode budget from the header alone.
    text = "NDims = 3\nDimSize = 40000 40000 4000\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    (tmp_path / "huge.mha").write_bytes(text.encode() + b"\x00" * 64)
    assert _reason(tmp_path / "huge.mha") == "decoded size over budget"
    # A compressed stream that inflates past what the header claims stops at the claim (a bomb, bounded).
    small = np.zeros((8, 8, 8), np.int16)
    bomb = zlib.compress(b"\x00" * (64 * 2**20))  # 64 MiB of zeros in ~64 KB
    write_metaimage(tmp_path / "bomb.mha", small, np.eye(4), compressed=True)
    head = (tmp_path / "bomb.mha").read_bytes().split(b"ElementDataFile = LOCAL\n")[0]
    (tmp_path / "bomb.mha").write_bytes(head + b"ElementDataFile = LOCAL\n" + bomb)
    assert _reason(tmp_path / "bomb.mha") == "truncated or malformed file"


@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
def test_a_huge_compressed_data_file_is_read_only_as_far_as_its_stream(tmp_path, reference, encoding) -> None:
    # The stream is followed by 64 GiB (a sparse file, no disk used): reading the file whole would exhaust
    # memory; the reader takes chunks until the stream ends and the voxels equal the NIfTI's.
    write_nrrd(tmp_path / "big.nhdr", _volume(), AFFINE, encoding=encoding, detached="big.raw")
    with open(tmp_path / "big.raw", "r+b") as handle:
        handle.truncate(64 * 2**30)
    _assert_same(tmp_path / "big.nhdr", reference)
