"""Reading every slice of a compressed volume: the volume reader vs nibabel's array proxy, side by side.

Run: ``python benchmarks/volumes.py [--slices 120] [--side 512] [--repeats 3]``. One synthetic int16 CT-like
volume is written as ``.nii.gz`` and ``.nii`` in a temporary folder, then, interleaved per round:

* ``nibabel proxy, slice by slice``: ``image.dataobj[:, :, k]`` for every k, what the reader did until
  2026-12-06: nibabel reopens the gzip stream and inflates it from the start for each slice, so the cost
  grows with the square of the slice count;
* ``reader``: :func:`modality.readers.read_slices` on the ``.nii.gz`` (the first volume inflated once, then cut
  into slices laid out as a viewer shows them);
* ``reader, uncompressed``: the same on the ``.nii`` (the floor: no inflate at all);
* ``nibabel, whole volume``: ``np.asarray(image.dataobj)`` (one inflate, no slicing or layout).

Prints the median seconds of each and the ratios against the reader; the slices of the two files are checked
to be identical first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from modality.training.hardware import cpu_banner


def write_volumes(folder: Path, side: int, slices: int) -> tuple[Path, Path]:
    import nibabel as nib

    rng = np.random.default_rng(0)
    voxels = rng.normal(0, 300, size=(side, side, slices)).astype(np.int16)
    packed, plain = folder / "ct.nii.gz", folder / "ct.nii"
    for path in (packed, plain):
        nib.save(nib.Nifti1Image(voxels, np.diag([0.7, 0.7, 1.5, 1.0])), path)
    return packed, plain


def proxy_slice_by_slice(path: Path) -> int:
    import nibabel as nib

    image = nib.load(path)
    for k in range(image.shape[2]):
        np.asarray(image.dataobj[:, :, k], dtype=np.float32)
    return image.shape[2]


def whole_volume(path: Path) -> int:
    import nibabel as nib

    image = nib.load(path)
    return np.asarray(image.dataobj).shape[2]


def read_axial(path: Path) -> list:
    """Every axial slice through the volume reader (kind ``nifti``)."""
    from modality.readers import read_slices
    from modality.records import InputItem

    return read_slices(InputItem(path=str(path), dataset="bench", kind="nifti", slice_axis=2))


def reader(path: Path) -> int:
    return len(read_axial(path))


def timed(run: Callable[[Path], int], path: Path) -> float:
    start = time.perf_counter()
    run(path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(cpu_banner())
    with tempfile.TemporaryDirectory() as folder:
        packed, plain = write_volumes(Path(folder), args.side, args.slices)
        one, two = read_axial(packed), read_axial(plain)
        if not all(np.array_equal(a.pixels, b.pixels) for a, b in zip(one, two, strict=True)):
            print("the .nii.gz and .nii slices differ", file=sys.stderr)
            return 1
        rows = {
            "nibabel proxy, slice by slice (.nii.gz)": (proxy_slice_by_slice, packed),
            "reader (.nii.gz)": (reader, packed),
            "reader, uncompressed (.nii)": (reader, plain),
            "nibabel, whole volume (.nii.gz)": (whole_volume, packed),
        }
        seconds: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, (run, path) in rows.items():
                seconds[name].append(timed(run, path))
    print(
        f"\n{args.side} x {args.side} x {args.slices} int16 volume, {args.repeats} interleaved rounds, medians\n"
    )
    print("| how | seconds | vs the reader (.nii.gz) |")
    print("|---|---|---|")
    reference = statistics.median(seconds["reader (.nii.gz)"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / reference:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
