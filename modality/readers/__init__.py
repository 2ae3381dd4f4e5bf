"""Readers: an :class:`InputItem` -> slice headers (cheap) -> decoded slices in modality units.

Dispatch is on ``item.kind`` (``dicom``, ``image``, ``nifti``, ``npy``); docs/readers.md says what each
reader does and which inputs it rejects. Every failure caused by the input raises
:class:`~modality.records.RejectedInput`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from modality.records import DecodedSlice, InputItem, RejectedInput, SliceHeader

#: Colour policies: convert colour to grey (BT.601 luma) or reject colour inputs.
COLOUR_POLICIES = ("grey", "reject")


def _readers(kind: str) -> tuple[Callable[..., list[SliceHeader]], Callable[..., list[DecodedSlice]]]:
    # Imported lazily: a worker that only reads PNGs need not import pydicom or nibabel.
    if kind == "dicom":
        from modality.readers.dicom import read_dicom_headers, read_dicom_slices

        return read_dicom_headers, read_dicom_slices
    if kind == "image":
        from modality.readers.image import read_image_headers, read_image_slices

        return read_image_headers, read_image_slices
    if kind in ("nifti", "npy"):
        from modality.readers.volume import read_volume_headers, read_volume_slices

        return read_volume_headers, read_volume_slices
    raise RejectedInput("unsupported file kind", f"kind {kind!r}; readers exist for dicom, image, nifti, npy")


def read_headers(item: InputItem) -> list[SliceHeader]:
    """One header per 2-D slice (DICOM frame, volume slice, or the single image), without decoding pixels."""
    headers, _ = _readers(item.kind)
    return headers(item)


def read_slices(
    item: InputItem, indices: Sequence[int] | None = None, *, colour: str = "grey"
) -> list[DecodedSlice]:
    """Decode the slices at ``indices`` (all when None), in that order, in modality units."""
    if colour not in COLOUR_POLICIES:
        raise ValueError(f"colour must be one of {COLOUR_POLICIES}, got {colour!r}")
    _, slices = _readers(item.kind)
    return slices(item, indices, colour=colour)


def read_headers_keeping_file(
    item: InputItem,
) -> tuple[list[SliceHeader], Callable[[Sequence[int] | None, str], list[DecodedSlice]]]:
    """Headers, plus a function ``decode(indices, colour)`` that decodes slices of the same file.

    For DICOM the decoder reuses the dataset parsed for the headers (one parse per file, which is what
    makes prepare's single pass cheaper than a header pass plus a decode pass); other kinds simply call
    :func:`read_slices`. Header failures raise here, decode failures when ``decode`` is called.
    """
    if item.kind == "dicom":
        from modality.readers.dicom import read_dicom_headers_keeping_file

        return read_dicom_headers_keeping_file(item)
    headers = read_headers(item)

    def decode(indices: Sequence[int] | None, colour: str) -> list[DecodedSlice]:
        return read_slices(item, indices, colour=colour)

    return headers, decode


__all__ = ["COLOUR_POLICIES", "read_headers", "read_headers_keeping_file", "read_slices"]
