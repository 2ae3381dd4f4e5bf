"""Readers against hostile files (issue 15): the decode budget, damaged codestreams, truncation, bad rescale.

Each file is crafted at test time from a real file of ``../shared/data/real`` (tests/hostile_files.py).
Before these fixes: the RLE bomb reached 1.8 GB before its rejection, the deflated bomb 4 GB, the PNG bomb
was decoded, a JPEG 2000 codestream with a bad sector decoded as a valid CT slice, a truncated J2K file
read as "no pixel data", a cut deflated file raised zlib.error out of the reader, and a NaN slope was
silently ignored.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hostile_files import (
    BAD_RESCALE,
    CORRUPT_PIXELS,
    DEFLATED,
    J2K_LOSSLESS,
    NATIVE,
    OVER_BUDGET,
    RLE,
    codestream,
    make_corrupt_codestream,
    make_cut_j2k_codestream,
    make_deflated_bomb,
    make_edited,
    make_huge_pixel_length,
    make_jpeg_claiming,
    make_nifti_bomb,
    make_npy_claiming,
    make_png_bomb,
    make_rle_bomb,
    make_syntax_swapped,
    make_truncated,
    manifest,
    real_dicom,
    real_image,
    run_measured,
)
from pydicom.encaps import generate_frames

from modality.paths import PROJECT_ROOT, shared_data_root
from modality.readers import (
    DEFAULT_MAX_FILE_PIXELS,
    DEFAULT_MAX_FRAME_PIXELS,
    DecodeBudget,
    decode_budget,
    read_headers,
    read_headers_keeping_file,
    read_slices,
)
from modality.readers.dicom import j2k_problem, jpeg_problem
from modality.records import InputItem, RejectedInput

pytestmark = pytest.mark.skipif(
    not (shared_data_root() / "manifest.csv").is_file(), reason="real corpus not found"
)


def dicom(path: Path) -> InputItem:
    return InputItem(str(path), "hostile", "dicom", label="CT")


def image(path: Path) -> InputItem:
    return InputItem(str(path), "hostile", "image", label="XR")


def rejection(item: InputItem, *, headers: bool = True) -> RejectedInput:
    """The rejection of the header pass (``headers``) or of the decode pass alone."""
    with pytest.raises(RejectedInput) as caught:
        if headers:
            read_headers(item)
        read_slices(item)
    return caught.value


def peak_read_mb(path: Path, kind: str) -> tuple[float, str]:
    """Peak RSS (MB) of a fresh process that reads ``path``'s headers and slices, and what it said."""
    script = (
        "from modality.readers import read_headers, read_slices\n"
        "from modality.records import InputItem, RejectedInput\n"
        f"item = InputItem({str(path)!r}, 'x', {kind!r}, label='CT')\n"
        "try:\n"
        "    read_headers(item); read_slices(item); print('decoded')\n"
        "except RejectedInput as e:\n"
        "    print(e.reason)\n"
    )
    result = run_measured([sys.executable, "-c", script], timeout=120)
    assert result["rc"] == 0, result["stderr"]
    return result["peak_mb"], result["stdout"].strip().splitlines()[-1]


def test_the_peak_measure_sees_what_a_process_allocates() -> None:
    """The control for every peak below: 300 MB touched in the measured process are seen, however big
    this test process has grown (Linux carries a peak RSS across fork and exec)."""
    script = "import numpy as np; a = np.ones(300 << 20, np.uint8); print(int(a.sum()) >> 20)"
    result = run_measured([sys.executable, "-c", script], timeout=60)
    assert result["stdout"].strip() == "300"
    assert 300 < result["peak_mb"] < 600, result["peak_mb"]


# ---------------------------------------------------------------- the decode budget


def test_default_budget_admits_real_scans_and_names_its_keys() -> None:
    budget = decode_budget()
    assert budget == DecodeBudget(DEFAULT_MAX_FRAME_PIXELS, DEFAULT_MAX_FILE_PIXELS)
    budget.check(5000, 4096)  # a large mammogram
    budget.check(4096, 5000, samples=3)  # a large colour frame
    budget.check(512, 512, frames=1000)  # a long enhanced CT
    with pytest.raises(RejectedInput, match=r"decode_budget\.max_frame_pixels") as caught:
        budget.check(13000, 13000)
    assert caught.value.reason == OVER_BUDGET
    with pytest.raises(RejectedInput, match=r"decode_budget\.max_file_pixels"):
        budget.check(512, 512, frames=2000)


def test_rle_bomb_is_rejected_from_its_header(tmp_path: Path) -> None:
    bomb = make_rle_bomb(tmp_path / "rle.dcm", real_dicom(NATIVE))
    assert bomb.stat().st_size < 10_000
    assert rejection(dicom(bomb)).reason == OVER_BUDGET
    assert rejection(dicom(bomb), headers=False).reason == OVER_BUDGET  # the decode path checks too
    with pytest.raises(RejectedInput) as headers_error:
        read_headers_keeping_file(dicom(bomb))
    assert headers_error.value.reason == OVER_BUDGET  # and prepare's single pass
    peak, said = peak_read_mb(bomb, "dicom")
    assert said == OVER_BUDGET and peak < 400, peak  # was 1.8 GB


def test_deflated_bomb_is_bounded_before_pydicom_inflates_it(tmp_path: Path) -> None:
    bomb = make_deflated_bomb(tmp_path / "deflated.dcm", real_dicom(NATIVE))
    assert bomb.stat().st_size < 6_000_000  # 800 MB of pixel data
    error = rejection(dicom(bomb))
    assert error.reason == OVER_BUDGET and "20000 x 20000" in error.detail
    peak, said = peak_read_mb(bomb, "dicom")
    assert said == OVER_BUDGET and peak < 400, peak  # was 4 GB


def test_deflated_stream_longer_than_its_pixel_data_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Within the budget by its header, but the stream inflates far past the pixel data it declares (a
    private element of zeros after it): refused before pydicom inflates it whole."""
    import modality.readers.dicom as reader

    monkeypatch.setattr(reader, "_DEFLATED_SLACK_BYTES", 1 << 20)
    template = real_dicom(NATIVE)
    honest = make_deflated_bomb(tmp_path / "honest.dcm", template, rows=64, columns=64, trailing=1 << 19)
    assert read_slices(dicom(honest))[0].pixels.shape == (64, 64)
    padded = make_deflated_bomb(tmp_path / "padded.dcm", template, rows=64, columns=64, trailing=8 << 20)
    error = rejection(dicom(padded))
    assert error.reason == OVER_BUDGET and "inflates past" in error.detail


def test_real_deflated_file_still_decodes() -> None:
    path = real_dicom(DEFLATED)
    assert read_slices(dicom(path))[0].pixels.shape == (512, 512)


def test_png_and_jpeg_bombs_are_rejected_before_loading(tmp_path: Path) -> None:
    bomb = make_png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1_000_000
    assert rejection(image(bomb)).reason == OVER_BUDGET
    peak, said = peak_read_mb(bomb, "image")
    assert said == OVER_BUDGET and peak < 400, peak
    claim = make_jpeg_claiming(tmp_path / "claim.jpg", real_image(".jpg"), 60000, 60000)
    assert rejection(image(claim)).reason == OVER_BUDGET


def test_pillow_bomb_limit_follows_the_budget(tmp_path: Path, monkeypatch) -> None:
    """Between the budget and twice it Pillow only warns; that warning is a rejection, not ignored."""
    from PIL import Image

    path = tmp_path / "grey.png"
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(path)
    monkeypatch.setenv("MODALITY_MAX_FRAME_PIXELS", str(300 * 300 - 1))
    assert rejection(image(path)).reason == OVER_BUDGET
    monkeypatch.setenv("MODALITY_MAX_FRAME_PIXELS", str(300 * 300))
    assert read_slices(image(path))[0].pixels.shape == (300, 300)


def test_budget_comes_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    path = real_dicom(NATIVE)
    assert read_headers(dicom(path))
    monkeypatch.setenv("MODALITY_MAX_FRAME_PIXELS", "1000")
    error = rejection(dicom(path))
    assert error.reason == OVER_BUDGET and "max_frame_pixels 1,000" in error.detail
    monkeypatch.setenv("MODALITY_MAX_FRAME_PIXELS", "300000")
    monkeypatch.setenv("MODALITY_MAX_FILE_PIXELS", "100000")
    assert "max_file_pixels 100,000" in rejection(dicom(path)).detail
    for bad in ("lots", "inf", "nan", "0", "-5"):
        monkeypatch.setenv("MODALITY_MAX_FILE_PIXELS", bad)
        with pytest.raises(ValueError, match="MODALITY_MAX_FILE_PIXELS"):
            decode_budget()


def test_volume_bombs_are_rejected_from_their_headers(tmp_path: Path) -> None:
    bomb = make_nifti_bomb(tmp_path / "bomb.nii.gz")
    assert bomb.stat().st_size < 6_000_000
    item = InputItem(str(bomb), "hostile", "nifti", label="CT")
    assert rejection(item).reason == OVER_BUDGET
    assert rejection(item, headers=False).reason == OVER_BUDGET
    peak, said = peak_read_mb(bomb, "nifti")
    assert said == OVER_BUDGET and peak < 400, peak  # was 3.1 GB for its one slice
    claim = make_npy_claiming(tmp_path / "claim.npy", (100_000, 100_000))
    assert rejection(InputItem(str(claim), "hostile", "npy", label="CT")).reason == OVER_BUDGET
    fine = tmp_path / "fine.npy"
    np.save(fine, np.zeros((4, 512, 512), np.int16))
    assert len(read_slices(InputItem(str(fine), "hostile", "npy", label="CT", slice_axis=0))) == 4


def test_real_volumes_fit_the_default_budget() -> None:
    table = manifest()
    volumes = sorted(set(table[table.kind == "volume"].path))
    read = 0
    for rel in volumes:
        if rel.lower().endswith((".img", ".nii", ".nii.gz")):
            headers = read_headers(InputItem(str(shared_data_root() / rel), "real", "nifti", label="PT"))
            read += bool(headers)
    assert read == sum(rel.lower().endswith((".img", ".nii", ".nii.gz")) for rel in volumes) >= 1


@pytest.mark.parametrize(
    ("name", "elements"),
    [
        ("frames", {"NumberOfFrames": 2**31 - 1}),
        ("rows", {"Rows": 65535, "Columns": 65535}),
        ("samples", {"SamplesPerPixel": 65535}),
    ],
)
def test_header_claims_above_the_budget(tmp_path: Path, name: str, elements: dict) -> None:
    path = make_edited(tmp_path / f"{name}.dcm", real_dicom(NATIVE), **elements)
    assert rejection(dicom(path)).reason == OVER_BUDGET


def test_prepare_config_key_changes_the_budget(tmp_path: Path) -> None:
    """``decode_budget.max_frame_pixels`` on prepare's command line reaches the readers in its workers."""
    from prepare_helpers import write_pool_config

    data = tmp_path / "data" / "site"
    data.mkdir(parents=True)
    (data / "ct.dcm").write_bytes(real_dicom(NATIVE).read_bytes())
    write_pool_config(tmp_path / "conf", "budgetpool", tmp_path / "data", {"site": "train"})

    def prepare(out: Path, *extra: str) -> dict:
        command = [
            sys.executable,
            "-m",
            "modality.prepare",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "dataset=budgetpool",
            f"out_dir={out}",
            "image_size=32",
            "workers=1",
            "progress=false",
            "charts=false",
            *extra,
        ]
        completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        return json.loads((out / "summary.json").read_text())

    assert prepare(tmp_path / "default")["inputs"]["written_files"] == 1
    summary = prepare(tmp_path / "small", "decode_budget.max_frame_pixels=1000")
    assert summary["inputs"]["written_files"] == 0
    rejects = (tmp_path / "small" / "rejects.csv").read_text()
    assert OVER_BUDGET in rejects and "max_frame_pixels 1,000" in rejects
    with pytest.raises(AssertionError, match="decode budget must be a positive number"):
        prepare(tmp_path / "bad", "decode_budget.max_file_pixels=-1")


# ---------------------------------------------------------------- damaged JPEG 2000


def _j2k_files(minimum_bytes: int) -> list[Path]:
    table = manifest()
    rows = table[
        table.transfer_syntax.isin([J2K_LOSSLESS, "1.2.840.10008.1.2.4.91"])
        & (table.decode_ok == "1")
        & (table.usable == "1")
    ]
    out = []
    for rel in sorted(set(rows.path)):
        path = shared_data_root() / rel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            if int(ds.get("NumberOfFrames", 1) or 1) != 1:
                continue
            try:
                if len(codestream(ds)) >= minimum_bytes:
                    out.append(path)
            except (ValueError, StopIteration):
                continue
    return out


def test_codestream_with_a_bad_sector_is_rejected_not_decoded(tmp_path: Path) -> None:
    """Every real single-frame J2K file (>= 16 KB of codestream) with 4 KB of random bytes in its middle.

    The first one of these, before the fix, decoded "fine" with a large share of its pixels wrong.
    """
    files = _j2k_files(16_384)
    assert len(files) >= 10
    for n, source in enumerate(files):
        bad = make_corrupt_codestream(tmp_path / f"bad{n}.dcm", source, seed=n)
        error = rejection(dicom(bad))
        assert error.reason == CORRUPT_PIXELS, (source, error)
        assert "marker code" in error.detail or "tile-part" in error.detail, error.detail


def test_corrupt_decode_would_have_been_wrong(tmp_path: Path) -> None:
    """What the rejection prevents: pydicom decodes the damaged stream without a word, mostly wrong."""
    source = real_dicom(J2K_LOSSLESS)
    bad = make_corrupt_codestream(tmp_path / "bad.dcm", source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good = pydicom.dcmread(source).pixel_array
        damaged = pydicom.dcmread(bad).pixel_array
    assert damaged.shape == good.shape and np.mean(damaged != good) > 0.01
    assert rejection(dicom(bad)).reason == CORRUPT_PIXELS


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9, 0.999])
def test_truncated_j2k_file_names_the_pixel_data(tmp_path: Path, fraction: float) -> None:
    cut = make_truncated(tmp_path / "cut.dcm", real_dicom(J2K_LOSSLESS), fraction)
    error = rejection(dicom(cut))
    assert error.reason == CORRUPT_PIXELS, error  # was "no pixel data"
    assert "ends inside the pixel data" in error.detail


def test_truncated_rle_file_names_the_pixel_data(tmp_path: Path) -> None:
    cut = make_truncated(tmp_path / "cut.dcm", real_dicom(RLE), 0.5)
    assert rejection(dicom(cut)).reason == CORRUPT_PIXELS


def test_codestream_cut_inside_a_whole_file(tmp_path: Path) -> None:
    cut = make_cut_j2k_codestream(tmp_path / "cut.dcm", real_dicom(J2K_LOSSLESS))
    error = rejection(dicom(cut))
    assert error.reason == CORRUPT_PIXELS and "EOC" in error.detail


JPEG_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": False,
    "1.2.840.10008.1.2.4.51": False,
    "1.2.840.10008.1.2.4.57": False,
    "1.2.840.10008.1.2.4.70": False,
    "1.2.840.10008.1.2.4.80": True,
    "1.2.840.10008.1.2.4.81": True,
}


def _jpeg_frames() -> list[tuple[Path, bool, list[bytes]]]:
    """Every real JPEG / JPEG-LS file (by its own File Meta) pydicom can split into frames:
    (path, is JPEG-LS, frames)."""
    out = []
    for rel in sorted(set(manifest().path)):
        path = shared_data_root() / rel
        if not rel.startswith("dicom/"):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
                syntax = str(ds.file_meta.TransferSyntaxUID)
                if syntax not in JPEG_SYNTAXES:
                    continue
                count = int(ds.get("NumberOfFrames", 1) or 1)
                frames = list(generate_frames(ds.PixelData, number_of_frames=count))
            except Exception:
                continue
        out.append((path, JPEG_SYNTAXES[syntax], frames))
    return out


def test_every_real_jpeg_codestream_passes_the_structure_check() -> None:
    files = _jpeg_frames()
    assert len(files) >= 100 and any(ls for _, ls, _ in files) and any(not ls for _, ls, _ in files)
    for path, ls, frames in files:
        for frame in frames:
            assert jpeg_problem(frame, ls=ls) is None, path


def test_jpeg_and_jpeg_ls_codestreams_with_a_bad_sector_are_rejected(tmp_path: Path) -> None:
    """libjpeg and CharLS decoded these silently (about half the pixels wrong); ten files per family."""
    picked = {False: [], True: []}
    for path, ls, frames in _jpeg_frames():
        if len(frames) == 1 and len(frames[0]) >= 16_384 and len(picked[ls]) < 10:
            try:
                read_slices(dicom(path))
            except RejectedInput:  # e.g. 12-bit lossy JPEG, which libjpeg refuses even when whole
                continue
            picked[ls].append(path)
    for ls, paths in picked.items():
        assert len(paths) == 10, ls
        for n, source in enumerate(paths):
            bad = make_corrupt_codestream(tmp_path / f"bad{int(ls)}{n}.dcm", source, seed=n)
            error = rejection(dicom(bad))
            assert error.reason == CORRUPT_PIXELS, (source, error)
            assert ("JPEG-LS" if ls else "JPEG codestream") in error.detail


def test_jpeg_structure_rules() -> None:
    data = bytes.fromhex("ffd8 ffdb 0004 0000 ffda 0004 0000 1234 ff00 56ff d0aa ffd9")
    assert jpeg_problem(data) is None
    assert jpeg_problem(data + b"\x20") is None  # one odd pad byte
    assert "entropy-coded" in jpeg_problem(data[:-2])  # cut: no EOI
    assert "EOI before any scan" in jpeg_problem(b"\xff\xd8\xff\xd9")
    assert "marker FF37" in jpeg_problem(data.replace(b"\xff\x00", b"\xff\x37"))
    assert "bytes of data after it" in jpeg_problem(data + b"\x12\x34\x56")
    # JPEG-LS stuffs a bit, not a byte: FF followed by a byte below 0x80 is data
    ls = data.replace(b"\xff\x00", b"\xff\x37")
    assert jpeg_problem(ls, ls=True) is None
    assert "marker FF9A" in jpeg_problem(ls.replace(b"\xff\x37", b"\xff\x9a"), ls=True)


def test_every_real_j2k_codestream_passes_the_structure_check() -> None:
    files = _j2k_files(0)
    assert len(files) >= 20
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = codestream(pydicom.dcmread(path))
        assert j2k_problem(data) is None, path


def test_j2k_structure_rules() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = codestream(pydicom.dcmread(real_dicom(J2K_LOSSLESS)))
    assert j2k_problem(data) is None
    assert j2k_problem(data + b"\x00") is None  # a fragment's even-length pad
    assert "SOC" in j2k_problem(b"\x00" + data)
    assert "EOC" in j2k_problem(data[:-2])
    body = data.rfind(b"\xff\x93") + 2
    marker = bytearray(data)
    marker[body + 100 : body + 102] = b"\xff\xa0"
    assert "marker code FFA0" in j2k_problem(bytes(marker))
    assert j2k_problem(bytes(marker), scan_packets=False) is None  # HTJ2K: structure only


# ---------------------------------------------------------------- rescale, truncation, syntax


@pytest.mark.parametrize(
    ("keyword", "value"), [("RescaleSlope", "NaN"), ("RescaleSlope", "inf"), ("RescaleIntercept", "-inf")]
)
def test_non_finite_rescale_is_rejected_not_ignored(tmp_path: Path, keyword: str, value: str) -> None:
    path = make_edited(tmp_path / "rescale.dcm", real_dicom(NATIVE), **{keyword: value})
    error = rejection(dicom(path))
    assert error.reason == BAD_RESCALE and keyword in error.detail


def test_cut_deflated_file_is_a_rejection_not_a_zlib_error(tmp_path: Path) -> None:
    cut = make_truncated(tmp_path / "cut.dcm", real_dicom(DEFLATED), 0.5)
    assert rejection(dicom(cut)).reason == "truncated or malformed file"


def test_file_cut_before_its_pixel_data_is_not_called_pixel_free(tmp_path: Path) -> None:
    source = real_dicom(NATIVE)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    assert "PixelData" not in ds
    cut = make_truncated(tmp_path / "cut.dcm", source, 0.01)
    error = rejection(dicom(cut))
    assert error.reason == "truncated or malformed file", error  # was "no pixel data"


def test_pixel_length_field_beyond_the_file_is_rejected(tmp_path: Path) -> None:
    path = make_huge_pixel_length(tmp_path / "long.dcm", real_dicom(NATIVE))
    error = rejection(dicom(path))
    assert error.reason == "truncated or malformed file" and "(7FE0,0010)" in error.detail


def test_little_endian_bytes_under_a_big_endian_syntax(tmp_path: Path) -> None:
    path = make_syntax_swapped(tmp_path / "big.dcm", real_dicom(NATIVE), "1.2.840.10008.1.2.2")
    error = rejection(dicom(path))
    assert error.reason == "truncated or malformed file" and "1.2.840.10008.1.2.2" in error.detail
