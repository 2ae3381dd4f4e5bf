"""Write tiny prepare-format shards for tests: the documented tar members plus a matching summary.json.

Pixels carry their sample number in the first two pixels (``id = p[0,0] * 256 + p[0,1]``) so DDP tests can
tell which samples each rank saw; the rest of the image is noise around a class-specific grey level, which
any network learns in a few steps.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["CT", "MR", "PT", "XR"]


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def tiny_image(sample_id: int, label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    level = 30 + 60 * label
    pixels = np.clip(rng.normal(level, 12, size=(size, size)), 0, 255).astype(np.uint8)
    pixels[0, 0], pixels[0, 1] = sample_id // 256, sample_id % 256
    return pixels


def encode(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    else:
        np.save(buffer, pixels, allow_pickle=False)
    return buffer.getvalue()


def write_tiny_shards(
    out_dir: str | Path,
    shard_sizes: dict[str, list[int]] | None = None,
    image_size: int = 32,
    image_format: str = "png",
    seed: int = 0,
) -> Path:
    """Shards ``{split}-{i:06d}.tar`` with the given samples per shard; returns ``out_dir``."""
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    shard_sizes = shard_sizes or {"train": [40, 24], "val": [16], "test": [12]}
    rng = np.random.default_rng(seed)
    sample_id = 0
    splits: dict[str, dict] = {}
    train_pixels: list[np.ndarray] = []
    for split, sizes in shard_sizes.items():
        shards, by_class = [], dict.fromkeys(CLASSES, 0)
        for index, count in enumerate(sizes):
            name = f"{split}-{index:06d}.tar"
            with tarfile.open(out / "shards" / name, "w") as tar:
                for _ in range(count):
                    label = sample_id % len(CLASSES)
                    pixels = tiny_image(sample_id, label, image_size, rng)
                    if split == "train":
                        train_pixels.append(pixels)
                    key = f"{sample_id:020x}"
                    meta = {"dataset": f"tiny_{split}", "class": CLASSES[label], "sample_id": sample_id}
                    _member(tar, f"{key}.{image_format}", encode(pixels, image_format))
                    _member(tar, f"{key}.cls", str(label).encode("ascii"))
                    _member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
                    by_class[CLASSES[label]] += 1
                    sample_id += 1
            shards.append({"name": name, "samples": count})
        splits[split] = {"samples": sum(sizes), "shards": shards, "by_class": by_class}
    stacked = np.stack(train_pixels).astype(np.float64) if train_pixels else np.zeros((1, 1))
    preprocess = {"image_size": image_size, "aspect": "pad", "scaling": {"method": "dtype"}, "colour": "grey"}
    summary = {
        "classes": CLASSES,
        "image_size": image_size,
        "image_format": image_format,
        "preprocess": preprocess,
        "seed": seed,
        "splits": splits,
        "stats": {
            "train": {
                "mean": stacked.mean(),
                "std": stacked.std(),
                "mean01": stacked.mean() / 255,
                "std01": stacked.std() / 255,
            }
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return out


def sample_ids(images: np.ndarray) -> list[int]:
    """Recover sample numbers from a uint8 batch (B, 1, H, W) written by :func:`write_tiny_shards`."""
    return [int(image[0, 0, 0]) * 256 + int(image[0, 0, 1]) for image in images]
