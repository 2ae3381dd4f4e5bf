"""Hostile inputs crafted at test time from real files of ``../shared/data/real`` (nothing checked in).

Each ``make_*`` function writes one file and returns its path; :func:`write_corpus` writes the whole set
into a folder and returns what each file must become: ``WRITTEN`` (at least one slice in the shards),
a specific rejection reason, or ``REJECTED`` (any stable reason: the point is only that it is not a crash
and not a silent drop). The bombs are real decodable files (a 13000 x 13000 PNG of zeros, a deflated DICOM
whose 800 MB of pixel data inflate from ~3.6 MB), so a reader without a decode budget really does
allocate gigabytes for them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from modality.paths import PROJECT_ROOT, shared_data_root

WRITTEN = "written"
REJECTED = "rejected"
OVER_BUDGET = "decoded size over budget"
CORRUPT_PIXELS = "truncated or corrupt pixel data"
BAD_RESCALE = "invalid rescale slope or intercept"

NATIVE = "1.2.840.10008.1.2.1"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"


#: Runs a command and reports the peak RSS of the largest process in its tree (the command, or one of its
#: pool workers), from a small wrapper process: Linux carries a process's peak RSS across fork and exec,
#: so a measure taken in (or below) a big pytest process would report that process's own size.
_MEASURED = (
    "import json, resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'rc': done.returncode, 'peak_mb': peak / 1024, 'stdout': done.stdout[-4000:],"
    " 'stderr': done.stderr[-4000:]}))\n"
)


def run_measured(command: list[str], timeout: float = 300) -> dict:
    """``rc``, ``peak_mb`` (largest process of the command's tree), ``stdout`` and ``stderr`` tails."""
    completed = subprocess.run(
        [sys.executable, "-c", _MEASURED, *command],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def manifest() -> pd.DataFrame:
    return pd.read_csv(shared_data_root() / "manifest.csv", dtype=str, keep_default_na=False)


def real_dicom(
    syntax: str, classes: tuple[str, ...] = ("CT",), max_bytes: int = 800_000, avoid: set[str] | None = None
) -> Path:
    """The first (by path) usable single-frame CT/MR file of ``syntax`` that our reader decodes; with
    ``avoid``, one whose decoded pixels differ from those hashed there (the hash is added), since the
    corpus holds one CT slice in many syntaxes and prepare rightly refuses duplicate images."""
    from modality.readers import read_slices
    from modality.records import InputItem, RejectedInput

    root = shared_data_root()
    table = manifest()
    rows = table[
        (table.kind == "dicom")
        & (table.transfer_syntax == syntax)
        & (table.usable == "1")
        & (table.decode_ok == "1")
        & table["class"].isin(classes)
        & (table.photometric == "MONOCHROME2")
    ].sort_values("path")
    for rel in rows.path:
        path = root / rel
        if not path.is_file() or path.stat().st_size > max_bytes:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1) != 1:
                continue
        try:
            pixels = read_slices(InputItem(str(path), "probe", "dicom"))[0].pixels
        except RejectedInput:
            continue
        if avoid is not None:
            digest = hashlib.sha1(pixels.tobytes()).hexdigest()
            if digest in avoid:
                continue
            avoid.add(digest)
        return path
    raise LookupError(f"no decodable single-frame {classes} file of syntax {syntax} in {root}")


def real_image(suffix: str, max_bytes: int = 500_000) -> Path:
    root = shared_data_root()
    table = manifest()
    rows = table[(table.kind == "xray") & table.path.str.lower().str.endswith(suffix)].sort_values("path")
    for rel in rows.path:
        path = root / rel
        if path.is_file() and path.stat().st_size <= max_bytes:
            return path
    raise LookupError(f"no {suffix} radiograph in {root}")


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def _save(ds: Dataset, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=False)
    return path


def codestream(ds: Dataset) -> bytes:
    """The single frame's codestream of an encapsulated dataset."""
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def with_codestream(ds: Dataset, data: bytes) -> Dataset:
    ds.PixelData = encapsulate([data])
    ds["PixelData"].VR = "OB"
    return ds


# ---------------------------------------------------------------- bombs


def make_deflated_bomb(
    path: Path, template: Path, rows: int = 20000, columns: int = 20000, trailing: int = 0
) -> Path:
    """A real Deflated Explicit VR Little Endian file of ``rows x columns`` 16-bit zeros (800 MB of pixel
    data for the default size), streamed through the compressor so the test never holds it: ~3.6 MB.
    ``trailing`` bytes of zeros follow the pixel data in a private OB element."""
    ds = _read(template)
    for keyword in ("PixelData", "NumberOfFrames"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 16, 16, 15, 1
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    length = rows * columns * 2
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with path.open("wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        meta_buffer = DicomBytesIO()
        write_file_meta_info(meta_buffer, meta, enforce_standard=True)
        handle.write(meta_buffer.getvalue())
        handle.write(compressor.compress(body.getvalue() + pixel_header))
        for size in (length, trailing):
            left = size
            while left:
                chunk = zeros[: min(left, len(zeros))]
                handle.write(compressor.compress(chunk))
                left -= len(chunk)
            if size == length and trailing:
                handle.write(compressor.compress(struct.pack("<HH2sHI", 0x7FE1, 0x0010, b"OB", 0, trailing)))
        handle.write(compressor.flush())
    return path


def make_rle_bomb(path: Path, template: Path, rows: int = 30000, columns: int = 30000) -> Path:
    """An RLE Lossless file of a few KB whose header claims ``rows x columns`` 16-bit pixels: the RLE
    decoder allocates the whole frame before it finds the segments far too short."""
    ds = _read(template)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    segment = b"\x81\x00" * 200  # runs of 128 zero bytes
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    return _save(with_codestream(ds, header + segment + segment), path)


def make_png_bomb(path: Path, side: int = 13000) -> Path:
    """A valid 8-bit greyscale PNG of ``side x side`` zeros (169 Mpx for 13000), ~170 KB on disk."""
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0, then the row
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return _write_png(path, side, side, 8, 0, idat)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_png(path: Path, width: int, height: int, depth: int, colour: int, idat: bytes) -> Path:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )
    return path


def make_jpeg_claiming(path: Path, template: Path, height: int, width: int) -> Path:
    """A real JPEG whose SOF marker is rewritten to claim ``height x width``."""
    data = bytearray(template.read_bytes())
    at = 2
    while at < len(data) - 9:
        marker = data[at + 1]
        if data[at] == 0xFF and marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, at + 5, height, width)
            break
        at += 2 + struct.unpack_from(">H", data, at + 2)[0]
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------- damaged codestreams and headers


def make_corrupt_codestream(path: Path, template: Path, sector: int = 4096, seed: int = 0) -> Path:
    """The codestream with ``sector`` bytes in its middle replaced by random bytes (a bad disk sector or
    a broken transfer), the file otherwise intact."""
    ds = _read(template)
    data = bytearray(codestream(ds))
    middle = len(data) // 2
    data[middle - sector // 2 : middle + sector // 2] = np.random.default_rng(seed).bytes(sector)
    return _save(with_codestream(ds, bytes(data)), path)


def make_cut_j2k_codestream(path: Path, template: Path, keep: float = 0.6) -> Path:
    """A valid file whose (re-encapsulated) codestream stops at ``keep`` of its length."""
    ds = _read(template)
    data = codestream(ds)
    return _save(with_codestream(ds, data[: int(len(data) * keep)]), path)


def make_truncated(path: Path, source: Path, fraction: float) -> Path:
    raw = source.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    return path


def make_edited(path: Path, template: Path, **elements: object) -> Path:
    """``template`` with header elements set (``None`` deletes), written without validation."""
    ds = _read(template)
    for keyword, value in elements.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return _save(ds, path)


def make_syntax_swapped(path: Path, source: Path, syntax: str) -> Path:
    """``source`` byte for byte, but its File Meta names another transfer syntax (pydicom refuses to
    write such a file, so the meta group is rewritten by hand)."""
    from pydicom.filereader import read_file_meta_info

    raw = source.read_bytes()
    meta = read_file_meta_info(source)
    (group_length,) = struct.unpack_from("<I", raw, 132 + 8)
    meta.TransferSyntaxUID = syntax
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(raw[:132] + buffer.getvalue() + raw[132 + 12 + group_length :])
    return path


def make_without_preamble(path: Path, source: Path) -> Path:
    raw = source.read_bytes()
    assert raw[128:132] == b"DICM"
    path.write_bytes(raw[132:])
    return path


def make_huge_pixel_length(path: Path, source: Path) -> Path:
    """A native file whose PixelData length field says 0xFFFFFFF0 bytes."""
    raw = bytearray(source.read_bytes())
    at = raw.rfind(b"\xe0\x7f\x10\x00")
    struct.pack_into("<I", raw, at + 8, 0xFFFFFFF0)  # explicit VR OW: tag, VR, 2 reserved, length
    path.write_bytes(bytes(raw))
    return path


# ---------------------------------------------------------------- images and volumes from real pixels


def real_pixels(source: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(source).pixel_array


def make_png_16bit(path: Path, source: Path) -> Path:
    from PIL import Image

    pixels = real_pixels(source).astype(np.int32)
    pixels = (pixels - pixels.min()).astype(np.uint16)
    Image.fromarray(pixels).save(path)
    return path


def make_png_rgba(path: Path, source: Path) -> Path:
    from PIL import Image, ImageOps

    with Image.open(source) as image:
        rgba = ImageOps.flip(image).convert("RGBA")  # flipped: not a duplicate of the original
        rgba.putalpha(128)
        rgba.save(path)
    return path


def make_png_mode(path: Path, source: Path, mode: str) -> Path:
    """``source`` mirrored (so prepare does not refuse it as a duplicate of the original) in ``mode``."""
    from PIL import Image, ImageOps

    with Image.open(source) as image:
        ImageOps.mirror(image).convert(mode).save(path)
    return path


def make_nifti(path: Path, source: Path) -> Path:
    import nibabel as nib

    slice_ = real_pixels(source).astype(np.int16)
    volume = np.stack([slice_, slice_[::-1]], axis=-1)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    return path


def make_nifti_header_only(path: Path) -> Path:
    import nibabel as nib

    image = nib.Nifti1Image(np.zeros((64, 64, 4), np.int16), np.eye(4))
    buffer = io.BytesIO()
    image.header.write_to(buffer)
    path.write_bytes(buffer.getvalue())
    return path


def make_nifti_bomb(path: Path, side: int = 20000) -> Path:
    """A real .nii.gz of ``side x side x 1`` int16 zeros (800 MB of voxels for 20000), ~3.5 MB on disk."""
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((side, side, 1))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    buffer = io.BytesIO()
    header.write_to(buffer)
    zeros = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(buffer.getvalue().ljust(352, b"\0"))
        left = side * side * 2
        while left:
            handle.write(zeros[: min(left, len(zeros))])
            left -= min(left, len(zeros))
    return path


def make_npy_claiming(path: Path, shape: tuple[int, ...], payload: int = 4096) -> Path:
    """An .npy header claiming ``shape`` float64 followed by only ``payload`` bytes."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
    path.write_bytes(buffer.getvalue() + bytes(payload))
    return path


# ---------------------------------------------------------------- the corpus


def write_corpus(dest: Path) -> dict[str, str]:
    """Write 70 inputs (a few real, the rest hostile) into ``dest/{dicom,images,volumes}``; path relative
    to ``dest`` (as the CSVs write it) -> expected outcome. Includes a symlink loop, a dangling link, a
    FIFO and a file name that is not UTF-8."""
    for kind in ("dicom", "images", "volumes"):
        (dest / kind).mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()  # the rarest syntax first: its only CT slice also exists in the others
    deflated = real_dicom(DEFLATED, avoid=seen)
    rle = real_dicom(RLE, avoid=seen)
    j2k = real_dicom(J2K_LOSSLESS, avoid=seen)
    jpeg_lossless = real_dicom(JPEG_LOSSLESS, classes=("CT", "MR"), avoid=seen)
    native = real_dicom(NATIVE, avoid=seen)
    other_native = real_dicom(NATIVE, classes=("CT", "MR"), avoid=seen)
    png = real_image(".png")
    jpg = real_image(".jpg")
    expected: dict[str, str] = {}

    def put(name: str, outcome: str, make=None) -> None:
        name = f"{folder(name)}/{name}"
        if make is not None:
            make(dest / name)
        expected[name] = outcome

    def folder(name: str) -> str:
        """One folder per reader kind, as a pool lists them (a folder source for each)."""
        lowered = name.lower()
        if lowered.endswith((".nii", ".nii.gz", ".npy")):
            return "volumes"
        return "images" if lowered.endswith((".png", ".jpg")) else "dicom"

    # real files, which must come through
    for name, source in (
        ("real_native.dcm", native),
        ("real_j2k.dcm", j2k),
        ("real_rle.dcm", rle),
        ("real_deflated.dcm", deflated),
        ("real_jpeg_lossless.dcm", jpeg_lossless),
        ("real_xray.png", png),
        ("real_xray.jpg", jpg),
    ):
        put(name, WRITTEN, lambda p, source=source: shutil.copyfile(source, p))
    put("real_ct.nii.gz", WRITTEN, lambda p: make_nifti(p, native))
    put("png_16bit.png", WRITTEN, lambda p: make_png_16bit(p, native))
    put("png_rgba.png", WRITTEN, lambda p: make_png_rgba(p, png))
    put("png_palette.png", WRITTEN, lambda p: make_png_mode(p, png, "P"))
    put("png_1bit.png", WRITTEN, lambda p: make_png_mode(p, png, "1"))
    put("dicom_without_preamble.dcm", WRITTEN, lambda p: make_without_preamble(p, other_native))

    # truncated at several offsets
    for fraction in (0.05, 0.5, 0.99):
        put(f"cut_native_{fraction}.dcm", REJECTED, lambda p, f=fraction: make_truncated(p, native, f))
    for fraction in (0.3, 0.7, 0.99):
        put(f"cut_j2k_{fraction}.dcm", CORRUPT_PIXELS, lambda p, f=fraction: make_truncated(p, j2k, f))
    put("cut_rle_0.5.dcm", CORRUPT_PIXELS, lambda p: make_truncated(p, rle, 0.5))
    put("cut_deflated_0.5.dcm", REJECTED, lambda p: make_truncated(p, deflated, 0.5))
    put("cut_jpeg_lossless_0.5.dcm", CORRUPT_PIXELS, lambda p: make_truncated(p, jpeg_lossless, 0.5))
    put("cut_xray_0.5.png", REJECTED, lambda p: make_truncated(p, png, 0.5))
    put("cut_xray_0.5.jpg", REJECTED, lambda p: make_truncated(p, jpg, 0.5))
    put("cut_ct_0.5.nii.gz", REJECTED, lambda p: make_truncated(p, dest / "volumes/real_ct.nii.gz", 0.5))

    # damaged codestreams and headers
    put("corrupt_j2k.dcm", CORRUPT_PIXELS, lambda p: make_corrupt_codestream(p, j2k))
    put("corrupt_jpeg_lossless.dcm", CORRUPT_PIXELS, lambda p: make_corrupt_codestream(p, jpeg_lossless))
    put("cut_j2k_codestream.dcm", CORRUPT_PIXELS, lambda p: make_cut_j2k_codestream(p, j2k))
    put("nan_slope.dcm", BAD_RESCALE, lambda p: make_edited(p, native, RescaleSlope="NaN"))
    put("inf_intercept.dcm", BAD_RESCALE, lambda p: make_edited(p, native, RescaleIntercept="-inf"))
    put("native_as_j2k.dcm", REJECTED, lambda p: make_syntax_swapped(p, native, J2K_LOSSLESS))
    put("j2k_as_native.dcm", REJECTED, lambda p: make_syntax_swapped(p, j2k, NATIVE))
    put("native_as_big_endian.dcm", REJECTED, lambda p: make_syntax_swapped(p, native, "1.2.840.10008.1.2.2"))
    put("unknown_syntax.dcm", REJECTED, lambda p: make_syntax_swapped(p, native, "1.2.3.4.5.6"))
    put("rows_zero.dcm", REJECTED, lambda p: make_edited(p, native, Rows=0))
    put("columns_zero.dcm", REJECTED, lambda p: make_edited(p, native, Columns=0))
    put("rows_65535.dcm", OVER_BUDGET, lambda p: make_edited(p, native, Rows=65535, Columns=65535))
    put("frames_huge.dcm", OVER_BUDGET, lambda p: make_edited(p, native, NumberOfFrames=2**31 - 1))
    put("frames_negative.dcm", REJECTED, lambda p: make_edited(p, native, NumberOfFrames=-5))
    put("frames_huge_j2k.dcm", OVER_BUDGET, lambda p: make_edited(p, j2k, NumberOfFrames=100_000))
    put("bits_allocated_0.dcm", REJECTED, lambda p: make_edited(p, native, BitsAllocated=0))
    put("bits_allocated_7.dcm", REJECTED, lambda p: make_edited(p, native, BitsAllocated=7))
    put("bits_allocated_64.dcm", REJECTED, lambda p: make_edited(p, native, BitsAllocated=64))
    put("samples_65535.dcm", OVER_BUDGET, lambda p: make_edited(p, native, SamplesPerPixel=65535))
    put("no_pixel_data.dcm", "no pixel data", lambda p: make_edited(p, native, PixelData=None))
    put("pixel_length_huge.dcm", REJECTED, lambda p: make_huge_pixel_length(p, native))
    put("empty.dcm", REJECTED, lambda p: p.write_bytes(b""))
    put("random_1k.dcm", "not a DICOM file", lambda p: p.write_bytes(np.random.default_rng(1).bytes(1024)))
    put("random_100k.dcm", REJECTED, lambda p: p.write_bytes(np.random.default_rng(2).bytes(100_000)))
    put("png_named_dcm.dcm", "not a DICOM file", lambda p: shutil.copyfile(png, p))
    put("dicom_named_png.png", "not an image file", lambda p: shutil.copyfile(native, p))

    # bombs
    put("bomb_deflated_20000.dcm", OVER_BUDGET, lambda p: make_deflated_bomb(p, native))
    put("bomb_rle_30000.dcm", OVER_BUDGET, lambda p: make_rle_bomb(p, native))
    put("bomb_13000.png", OVER_BUDGET, make_png_bomb)
    put("bomb_claims_100000.png", OVER_BUDGET, lambda p: _write_png(p, 100000, 100000, 8, 0, b""))
    put("bomb_claims_60000.jpg", OVER_BUDGET, lambda p: make_jpeg_claiming(p, jpg, 60000, 60000))
    put("bomb_20000.nii.gz", OVER_BUDGET, make_nifti_bomb)

    # images and volumes
    put("empty.png", REJECTED, lambda p: p.write_bytes(b""))
    put("random.png", "not an image file", lambda p: p.write_bytes(np.random.default_rng(3).bytes(5000)))
    put("empty.nii", REJECTED, lambda p: p.write_bytes(b""))
    put("header_only.nii", REJECTED, make_nifti_header_only)
    put("empty.npy", REJECTED, lambda p: p.write_bytes(b""))
    put("object_dtype.npy", REJECTED, lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object)))
    put("claims_huge.npy", OVER_BUDGET, lambda p: make_npy_claiming(p, (100_000, 100_000)))
    put("four_d.npy", REJECTED, lambda p: np.save(p, np.zeros((2, 3, 4, 5), np.int16)))
    put("cut.npy", REJECTED, lambda p: make_truncated(p, _npy(dest / "whole.npy"), 0.5))
    (dest / "whole.npy").unlink()

    # paths that are no regular file, and a name that is not UTF-8 (CSV rows write it as \xff)
    os.symlink("loop.dcm", dest / "dicom" / "loop.dcm")
    expected["dicom/loop.dcm"] = "symlink loop"
    os.symlink("nowhere.png", dest / "images" / "dangling.png")
    expected["images/dangling.png"] = "dangling symlink"
    os.mkfifo(dest / "dicom" / "pipe.dcm")
    expected["dicom/pipe.dcm"] = "not a regular file (FIFO)"
    make_edited(
        Path(os.fsdecode(os.fsencode(dest / "dicom") + b"/latin1_\xff_nan.dcm")), native, RescaleSlope="NaN"
    )
    expected["dicom/latin1_\\xff_nan.dcm"] = BAD_RESCALE
    return expected


def _npy(path: Path) -> Path:
    np.save(path, np.arange(64 * 64 * 3, dtype=np.int16).reshape(64, 64, 3))
    return path
