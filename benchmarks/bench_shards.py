"""Benchmark shards built from the real corpus: the same images as PNG members, npy members and loose files.

PNG decode cost depends on image content, so the benchmark images are real slices (DICOM and radiographs
from ``modality.paths.shared_data_root()``, scaled and padded to 224x224), not noise. Decoding the corpus
takes a minute, so the slices are cached as one npy file outside the repository. When ``python -m
modality.prepare`` output exists, pass it to the benchmarks instead (``--prepared``).

The shards follow docs/design.md ("Shards"): ``<key>.png|npy``, ``<key>.cls``, ``<key>.json``, 20-hex-digit
keys, normalised headers (mtime 0, uid/gid 0, mode 0o444), written as ``.partial`` and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from modality.paths import shared_data_root
from modality.shards.decode import encode_npy_uint8

CACHE_DIR = Path(os.environ.get("MODALITY_BENCH_CACHE", Path.home() / ".cache" / "modality-bench"))
CLASSES = ("CT", "MR", "PT", "XR")


def _to_uint8_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Percentile-scale a slice to uint8 and pad it to a square of ``size`` (aspect kept)."""
    pixels = pixels.astype(np.float32)
    low, high = np.percentile(pixels, (0.5, 99.5))
    scaled = np.clip((pixels - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    image = Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8), mode="L")
    scale = size / max(image.size)
    resized = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return np.asarray(canvas)


def _slices_of_file(path: Path, kind: str) -> list[np.ndarray]:
    if kind == "dicom":
        import pydicom

        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
        if getattr(dataset, "SamplesPerPixel", 1) != 1:
            pixels = pixels.mean(axis=-1)
        if pixels.ndim == 3:
            return [pixels[0], pixels[len(pixels) // 2]]
        return [pixels]
    with Image.open(path) as image:
        return [np.asarray(image.convert("L"))]


def real_slices(
    size: int = 224, max_files: int = 1400, time_budget_s: float = 240.0
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 Nx size x size, class indices) decoded from the real corpus, cached after the first call."""
    cache = CACHE_DIR / f"real-slices-{size}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as saved:
            return saved["images"], saved["labels"]
    root = shared_data_root()
    manifest = root / "manifest.csv"
    if not manifest.exists():
        raise FileNotFoundError(f"real corpus not found at {root}; set MODALITY_SHARED_DATA")
    images: list[np.ndarray] = []
    labels: list[int] = []
    started = time.monotonic()
    with open(manifest, newline="") as handle:
        rows = [
            row for row in csv.DictReader(handle) if row.get("usable", "1") == "1" and row["class"] in CLASSES
        ]
    for row in rows[:max_files]:
        if time.monotonic() - started > time_budget_s:
            break
        try:
            slices = _slices_of_file(root / row["path"], row["kind"])
        except Exception:  # broken-on-purpose files and codecs we lack: the benchmark just skips them
            continue
        for pixels in slices:
            if pixels.ndim == 2 and min(pixels.shape) >= 8:
                images.append(_to_uint8_square(pixels, size))
                labels.append(CLASSES.index(row["class"]))
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    stacked, label_array = np.stack(images), np.asarray(labels, dtype=np.int64)
    np.savez(cache, images=stacked, labels=label_array)
    return stacked, label_array


def synthetic_slices(count: int = 512, size: int = 224, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Phantom-like slices (ellipses, texture, noise, black padding) for machines without the real corpus.

    Only a stand-in: PNG decode cost depends on content, so loader figures from these are marked as such.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    images = np.empty((count, size, size), dtype=np.uint8)
    for index in range(count):
        body = np.zeros((size, size), dtype=np.float32)
        for _ in range(rng.integers(2, 6)):
            cy, cx, ry, rx = rng.uniform(-0.2, 0.2, 2).tolist() + rng.uniform(0.05, 0.4, 2).tolist()
            body += rng.uniform(40, 120) * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
        body += 15 * np.sin(xx * rng.uniform(20, 60)) * np.cos(yy * rng.uniform(20, 60))
        body += rng.normal(0, 8, (size, size))
        pad = int(rng.integers(0, size // 6))
        if pad:
            body[:pad], body[size - pad :] = 0, 0
        images[index] = np.clip(body, 0, 255).astype(np.uint8)
    return images, rng.integers(0, len(CLASSES), count)


def benchmark_images(samples: int, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` real slices (the corpus repeated, each repeat mirrored or rolled so PNGs differ).

    Falls back to :func:`synthetic_slices` (with a warning) where the real corpus is absent, e.g. on a GPU
    machine that received only the repository.
    """
    try:
        images, labels = real_slices(size)
    except FileNotFoundError as missing:
        print(f"WARNING: {missing}; using synthetic phantom slices instead", file=sys.stderr)
        images, labels = synthetic_slices(size=size)
    out = np.empty((samples, size, size), dtype=np.uint8)
    for i in range(samples):
        source = images[i % len(images)]
        repeat = i // len(images)
        out[i] = np.roll(source[:, ::-1] if repeat % 2 else source, shift=repeat // 2, axis=1)
    return out, labels[np.arange(samples) % len(labels)]


def encode_png_pil(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """A PNG as PIL writes it (adaptive per-row filters): what most tools produce, decoded by PIL."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def encode_png_prepare(pixels: np.ndarray) -> bytes:
    """A PNG member exactly as ``python -m modality.prepare`` writes it (its own encoder, default level)."""
    from modality.shards.work import encode_member

    return encode_member(pixels, "png")


#: Member encoders by layout: ``png`` = prepare's PNG members, ``png-pil`` = PIL PNGs, ``npy`` = raw.
ENCODERS = {"png": encode_png_prepare, "png-pil": encode_png_pil, "npy": encode_npy_uint8}


def member_extension(layout: str) -> str:
    return "npy" if layout == "npy" else "png"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    out_dir: Path, images: np.ndarray, labels: np.ndarray, layout: str, per_shard: int = 1000
) -> list[Path]:
    """Shards ``train-{i:06d}.tar`` of the given images in the documented format; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    encode, image_format = ENCODERS[layout], member_extension(layout)
    paths = []
    for shard, start in enumerate(range(0, len(images), per_shard)):
        path = out_dir / f"train-{shard:06d}.tar"
        partial = path.with_name(path.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, min(start + per_shard, len(images))):
                key = f"{index:020x}"
                meta = {"dataset": "bench", "class": CLASSES[int(labels[index])], "slice_index": 0}
                _add_member(tar, f"{key}.{image_format}", encode(images[index]))
                _add_member(tar, f"{key}.cls", str(int(labels[index])).encode())
                _add_member(tar, f"{key}.json", json.dumps(meta).encode())
        partial.rename(path)
        paths.append(path)
    return paths


def write_png_folder(out_dir: Path, images: np.ndarray) -> list[Path]:
    """One PNG file per image (the reference study's layout), written by PIL."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = out_dir / f"{index:06d}.png"
        path.write_bytes(encode_png_pil(image, compress_level=6))
        paths.append(path)
    return paths
