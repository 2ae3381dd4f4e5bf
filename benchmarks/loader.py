"""Loader throughput: the ModalityDataModule against stock webdataset, one PNG file per image and memory.

Every configuration reads the same real 224x224 slices (see bench_shards.py) in batches of 128, with the
page cache warm and cold (each file evicted with ``posix_fadvise(DONTNEED)`` before the pass), with 0 and
2 DataLoader workers, all in one run so the ratios compare like with like. Printed as a Markdown table:

* img/s: images delivered per wall-clock second.
* CPU ms/img: CPU time of the process and its DataLoader workers (user + system) per image; with 2
  workers this is the total over both cores. Targets (issue 3): PNG path <= 0.40, raw (npy) <= 0.06.

Configurations:

* ``datamodule png``: ModalityDataModule.train_dataloader (resampled shards, shuffle buffer, fast tar
  stage, decode, in-dataset batching) on PNG members as prepare writes them (Up-filtered rows,
  ISA-L deflate: modality.shards.work.encode_member).
* ``datamodule png-pil``: the same on PNG members written by PIL (adaptive filters, level 1), which take
  the general PIL decode path.
* ``datamodule npy``: the same on raw ``.npy`` members.
* ``stock wds png`` / ``stock wds npy``: ``wds.WebDataset(urls).decode("l").to_tuple(...)`` batched by the
  DataLoader, the pipeline the measured-facts table used, on the same shards as the datamodule rows.
* ``png files``: the reference study's layout, a folder of PNG files read with PIL in a Dataset.
* ``memory``: a uint8 array indexed per sample (the upper bound).

Run: ``python benchmarks/loader.py`` (20k images, a few minutes the first time while shards are built and
cached under ~/.cache/modality-bench) or ``--samples 4000`` for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import bench_shards
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from modality.training.hardware import cpu_banner

BATCH = 128


@dataclass
class Measurement:
    config: str
    cache: str
    workers: int
    images: int
    wall_s: float
    cpu_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def cpu_ms_per_image(self) -> float:
        return 1e3 * self.cpu_s / self.images


def _cpu_seconds() -> float:
    """CPU of this process plus its reaped children (DataLoader workers are joined when the pass ends)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def evict_from_page_cache(paths: Iterable[Path]) -> None:
    """Drop the files' pages so the next read comes from disk (what a first epoch over big data sees)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(paths: Iterable[Path]) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass


class PngFolder(Dataset):
    """The reference study's loader: one PNG file per image, opened with PIL per item."""

    def __init__(self, paths: list[Path], labels: np.ndarray) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            pixels = np.asarray(image.convert("L") if image.mode != "L" else image)
        return torch.from_numpy(pixels.copy()).unsqueeze(0), int(self.labels[index])


class InMemory(Dataset):
    """A uint8 array indexed per sample: no I/O and no decode, the ceiling for any loader."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = torch.from_numpy(images), labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].unsqueeze(0), int(self.labels[index])


def build_data(
    samples: int, root: Path, layouts: tuple[str, ...] = ("png", "png-pil", "npy"), png_files: bool = True
) -> dict[str, object]:
    """Shards (one data dir per member layout), a PNG folder and the in-memory array for ``samples`` images."""
    images, labels = bench_shards.benchmark_images(samples)
    data: dict[str, object] = {"images": images, "labels": labels}
    for layout in layouts:
        out_dir = root / layout
        shard_dir = out_dir / "shards"
        summary_path = out_dir / "summary.json"
        if not summary_path.exists():
            print(f"writing {layout} shards for {samples} images under {shard_dir} ...", file=sys.stderr)
            paths = bench_shards.write_shards(shard_dir, images, labels, layout)
            shards = [
                {"name": path.name, "samples": min(1000, samples - 1000 * i)} for i, path in enumerate(paths)
            ]
            summary = {
                "classes": list(bench_shards.CLASSES),
                "image_size": 224,
                "image_format": bench_shards.member_extension(layout),
                "preprocess": {"image_size": 224},
                "splits": {"train": {"samples": samples, "shards": shards}},
                "stats": {
                    "train": {"mean01": float(images.mean() / 255), "std01": float(images.std() / 255)}
                },
            }
            summary_path.write_text(json.dumps(summary))
        data[layout] = out_dir
    if not png_files:
        return data
    folder = root / "files"
    marker = folder / "complete"
    if not marker.exists():
        print(f"writing {samples} PNG files under {folder} ...", file=sys.stderr)
        bench_shards.write_png_folder(folder, images)
        marker.write_text("ok")
    data["files"] = sorted(folder.glob("*.png"))
    return data


def shard_paths(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "shards").glob("*.tar"))


def datamodule_loader(out_dir: Path, samples: int, workers: int) -> DataLoader:
    from modality.data.datamodule import ModalityDataModule

    module = ModalityDataModule(
        data_dir=str(out_dir),
        batch_size=BATCH,
        num_workers=workers,
        persistent_workers=False,  # workers must exit (and be reaped) for their CPU time to be counted
        pin_memory=False,
        samples_per_epoch=samples,
        prepare_dataset=None,
    )
    module.setup("fit")
    return module.train_dataloader()


def stock_webdataset_loader(out_dir: Path, member: str, workers: int) -> DataLoader:
    urls = [str(path) for path in shard_paths(out_dir)]
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)
        .decode("l")
        .to_tuple(member, "cls")
        .map_tuple(lambda pixels: torch.from_numpy(np.asarray(pixels)).unsqueeze(0), lambda label: label)
    )
    return DataLoader(dataset, batch_size=BATCH, num_workers=workers)


def run_pass(config: str, cache: str, workers: int, make_loader: Callable[[], DataLoader], files: list[Path]):
    if cache == "cold":
        evict_from_page_cache(files)
    else:
        warm_page_cache(files)
    loader = make_loader()  # building the DataModule is set-up, not loading; workers start inside the pass
    cpu_start, wall_start = _cpu_seconds(), time.perf_counter()
    images = 0
    for batch_images, _labels in loader:
        images += len(batch_images)
    del loader  # joins the workers, so RUSAGE_CHILDREN includes them
    wall, cpu = time.perf_counter() - wall_start, _cpu_seconds() - cpu_start
    return Measurement(config, cache, workers, images, wall, cpu)


def markdown(results: list[Measurement], reference: str) -> str:
    base = {(m.cache, m.workers): m for m in results if m.config == reference}
    lines = [
        f"| config | cache | workers | img/s | CPU ms/img | speed vs {reference} | CPU vs {reference} |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in results:
        ref = base.get((m.cache, m.workers))
        speed = f"{m.images_per_s / ref.images_per_s:.2f}x" if ref else "-"
        cpu = f"{m.cpu_ms_per_image / ref.cpu_ms_per_image:.2f}x" if ref else "-"
        lines.append(
            f"| {m.config} | {m.cache} | {m.workers} | {m.images_per_s:,.0f} | {m.cpu_ms_per_image:.3f} "
            f"| {speed} | {cpu} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000, help="images per pass (default 20000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--cache", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    parser.add_argument("--configs", nargs="+", default=None, help="subset of configurations to run")
    parser.add_argument("--root", type=Path, default=None, help="where benchmark data is built and kept")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(cpu_banner())
    root = args.root or bench_shards.CACHE_DIR / f"loader-v2-{args.samples}"
    data = build_data(args.samples, root)
    samples = args.samples
    files: list[Path] = data["files"]  # type: ignore[assignment]
    configs: dict[str, tuple[Callable[[int], DataLoader], list[Path]]] = {
        "datamodule png": (lambda w: datamodule_loader(data["png"], samples, w), shard_paths(data["png"])),
        "datamodule png-pil": (
            lambda w: datamodule_loader(data["png-pil"], samples, w),
            shard_paths(data["png-pil"]),
        ),
        "datamodule npy": (lambda w: datamodule_loader(data["npy"], samples, w), shard_paths(data["npy"])),
        "stock wds png": (lambda w: stock_webdataset_loader(data["png"], "png", w), shard_paths(data["png"])),
        "stock wds npy": (lambda w: stock_webdataset_loader(data["npy"], "npy", w), shard_paths(data["npy"])),
        "png files": (
            lambda w: DataLoader(PngFolder(files, data["labels"]), batch_size=BATCH, num_workers=w),
            files,
        ),
        "memory": (
            lambda w: DataLoader(InMemory(data["images"], data["labels"]), batch_size=BATCH, num_workers=w),
            [],
        ),
    }
    chosen = args.configs or list(configs)
    results = []
    for cache in args.cache:
        for workers in args.workers:
            for config in chosen:
                if config == "memory" and cache == "cold":
                    continue
                make, paths = configs[config]
                result = run_pass(
                    config, cache, workers, lambda make=make, workers=workers: make(workers), paths
                )
                results.append(result)
                print(
                    f"{config:18s} {cache:4s} w={workers}: {result.images_per_s:8,.0f} img/s "
                    f"{result.cpu_ms_per_image:.3f} CPU ms/img",
                    file=sys.stderr,
                )
    print(f"\n{samples} images of 224x224 uint8, batch {BATCH}, torch threads 1, {os.cpu_count()} CPUs\n")
    print(markdown(results, "stock wds png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
