"""MetaImage and NRRD writers for tests, from the formats' specifications (not from the reader under test):
MetaIO positions in LPS with TransformMatrix row i = image axis i's direction; NRRD ``space directions`` per
axis with the spacing in them."""

from __future__ import annotations

import bz2
import gzip
import zlib
from pathlib import Path

import numpy as np

LPS = np.diag([-1.0, -1.0, 1.0])


def _lps_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing per axis, unit direction per axis as rows, origin), all in LPS."""
    columns = LPS @ affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    return spacing, (columns / spacing).T, LPS @ affine[:3, 3]


def _numbers(values: np.ndarray) -> str:
    return " ".join(repr(float(v)) for v in np.ravel(values))


def write_metaimage(
    path: Path,
    voxels: np.ndarray,
    affine: np.ndarray,
    *,
    compressed: bool = False,
    big_endian: bool = False,
    detached: str | None = None,
    header_size: int | None = None,
    extra: str = "",
) -> None:
    met = {"int16": "MET_SHORT", "uint8": "MET_UCHAR", "float32": "MET_FLOAT", "int32": "MET_INT"}
    spacing, directions, origin = _lps_geometry(affine)
    data = voxels.astype(voxels.dtype.newbyteorder(">" if big_endian else "<")).tobytes(order="F")
    if compressed:
        data = zlib.compress(data)
    lines = [
        "ObjectType = Image",
        f"NDims = {voxels.ndim}",
        "BinaryData = True",
        f"BinaryDataByteOrderMSB = {'True' if big_endian else 'False'}",
        f"CompressedData = {'True' if compressed else 'False'}",
        f"TransformMatrix = {_numbers(directions)}",
        f"Offset = {_numbers(origin)}",
        "AnatomicalOrientation = RAI",
        f"ElementSpacing = {_numbers(spacing)}",
        f"DimSize = {' '.join(str(s) for s in voxels.shape)}",
        f"ElementType = {met[str(voxels.dtype)]}",
    ]
    if extra:
        lines.append(extra)
    if header_size is not None:
        lines.append(f"HeaderSize = {header_size}")
    lines.append(f"ElementDataFile = {detached or 'LOCAL'}")
    text = ("\n".join(lines) + "\n").encode()
    if detached:
        path.write_bytes(text)
        prefix = b"\x07" * 100 if header_size == 100 else b"\x07" * 37 if header_size == -1 else b""
        (path.parent / detached).write_bytes(prefix + data)
    else:
        path.write_bytes(text + data)


def write_nrrd(
    path: Path,
    voxels: np.ndarray,
    affine: np.ndarray,
    *,
    space: str = "left-posterior-superior",
    encoding: str = "raw",
    big_endian: bool = False,
    detached: str | None = None,
) -> None:
    names = {"int16": "short", "uint8": "uchar", "float32": "float", "int32": "int"}
    flip = LPS if space == "left-posterior-superior" else np.eye(3)
    columns = flip @ affine[:3, :3]
    origin = flip @ affine[:3, 3]
    data = voxels.astype(voxels.dtype.newbyteorder(">" if big_endian else "<")).tobytes(order="F")
    if encoding == "gzip":
        data = gzip.compress(data)
    elif encoding == "bzip2":
        data = bz2.compress(data)
    elif encoding == "ascii":
        data = " ".join(str(v) for v in voxels.ravel(order="F")).encode() + b"\n"
    directions = " ".join(f"({','.join(repr(float(v)) for v in columns[:, i])})" for i in range(3))
    lines = [
        "NRRD0004",
        "# written by the test",
        f"type: {names[str(voxels.dtype)]}",
        "dimension: 3",
        f"space: {space}",
        f"sizes: {' '.join(str(s) for s in voxels.shape)}",
        f"space directions: {directions}",
        "kinds: domain domain domain",
        f"endian: {'big' if big_endian else 'little'}",
        f"encoding: {encoding}",
        f"space origin: ({','.join(repr(float(v)) for v in origin)})",
        "modality:=CT",
    ]
    if detached:
        lines.append(f"data file: {detached}")
        path.write_bytes(("\n".join(lines) + "\n").encode())
        (path.parent / detached).write_bytes(data)
    else:
        path.write_bytes(("\n".join(lines) + "\n\n").encode() + data)
