"""Our hand-written shard I/O against the libraries it replaced, side by side, plus what limits each path.

Issue 17, item 5: hand-written infrastructure stays only where it matters by more than 10% on a path that
limits training or prepare. One run measures, on the same real slices (the PNG members and JSON metadata of
a prepared folder's shards, e.g. ``data/real_shared/prepared_percentile_all``; phantom slices where none
exists):

* writer: N samples (PNG + cls + JSON) into tar shards with ``modality.shards.writer.ShardWriter`` vs
  ``webdataset.TarWriter`` (with the same ``.partial`` + fsync + rename around it), and whether each writes
  byte-identical files for identical input (prepare promises byte-identical reruns);
* PNG: encode a 224x224 uint8 slice with ``modality.shards.png_codec`` (Up rows, libdeflate level 1, what
  prepare writes) vs PIL at the same level (cv2 too when installed); decode ours with our codec and with PIL;
* reader: a shard to ``(uint8 tensor, label)`` with the DataModule's stages (``tarfile_to_samples`` from
  modality/data/tar_samples.py + ``labelled_image``) vs stock ``webdataset.WebDataset(...).decode("l")``,
  and the two crossed (stock tar + our decode, our tar + PIL decode) to split the gain between the pieces;
* context: CPU per sample of a resnet18 64-px train step (the consumer of the loader) and of prepare's
  per-file work on real DICOM files (the consumer of the writer and encoder).

Each comparison runs its sides alternately over ``--repeats`` rounds and prints medians of CPU time (process
time; less disturbed by other jobs than wall time, also printed) and their ratio. Run:
``nice python benchmarks/shard_io.py`` (about 2 minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from modality.data.stages import labelled_image
from modality.data.tar_samples import tarfile_to_samples
from modality.paths import shared_data_root
from modality.shards.png_codec import decode_png_grey, decode_png_with_pil
from modality.shards.reader import read_shard_samples
from modality.shards.work import encode_member
from modality.shards.writer import PARTIAL_SUFFIX, ShardWriter, fsync_dir
from modality.training.hardware import cpu_banner

DEFAULT_PREPARED = Path("data/real_shared/prepared_percentile_all")
PNG_LEVEL = 1  # DecodeJob.png_compress_level, prepare's default
STOCK = "stock WebDataset .decode('l')"
TARWRITER = "webdataset.TarWriter (+ .partial, fsync, rename)"


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall s, CPU s) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Every side once per round, in a rotated order, so load from other jobs falls on all of them."""
    names = list(sides)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for side in names:  # warm-up: imports, page cache, lru caches
        sides[side]()
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(timed(sides[name]))
    return results


def cpu_ms(results: dict[str, list[tuple[float, float]]], side: str, count: int) -> float:
    return 1e3 * statistics.median(c for _, c in results[side]) / count


def print_table(title: str, results: dict[str, list[tuple[float, float]]], count: int, unit: str) -> None:
    baseline = next(iter(results))
    base_cpu = statistics.median(c for _, c in results[baseline])
    print(f"\n### {title}\n")
    print(
        f"| side | CPU ms/{unit} (median) | wall ms/{unit} (median) | CPU vs {baseline} | CPU ms/{unit} by round |"
    )
    print("|---|---|---|---|---|")
    for name, values in results.items():
        cpu = statistics.median(c for _, c in values)
        wall = statistics.median(w for w, _ in values)
        rounds = ", ".join(f"{1e3 * c / count:.3f}" for _, c in values)
        print(
            f"| {name} | {1e3 * cpu / count:.3f} | {1e3 * wall / count:.3f} | {cpu / base_cpu:.2f}x | {rounds} |"
        )


# ---------------------------------------------------------------- data


def load_samples(prepared: Path, count: int) -> list[tuple[np.ndarray, bytes, bytes, bytes]]:
    """``count`` samples (pixels, png member, cls member, json member) from a prepared folder's shards."""
    samples = []
    for shard in sorted((prepared / "shards").glob("*.tar")):
        for _, members in read_shard_samples(shard):
            if "png" in members:
                pixels = np.array(decode_png_grey(members["png"]))
                samples.append((pixels, members["png"], members["cls"], members["json"]))
            if len(samples) == count:
                return samples
    if not samples:
        raise FileNotFoundError(f"no PNG shards under {prepared}")
    return [samples[i % len(samples)] for i in range(count)]


def phantom_samples(count: int) -> list[tuple[np.ndarray, bytes, bytes, bytes]]:
    import bench_shards

    print("WARNING: no prepared shards; phantom slices stand in (PNG costs depend on content)")
    images, labels = bench_shards.synthetic_slices(count)
    meta = json.dumps({"dataset": "bench", "class": "CT", "slice_index": 0}).encode()
    return [
        (im, encode_member(im, "png"), str(int(lb)).encode(), meta)
        for im, lb in zip(images, labels, strict=True)
    ]


# ---------------------------------------------------------------- (a) writer


def write_ours(
    directory: Path, samples: Iterable[tuple[str, list[tuple[str, bytes]]]], per_shard: int
) -> None:
    with ShardWriter(directory, "train", per_shard) as writer:
        for key, members in samples:
            writer.write(key, members)


def write_webdataset(
    directory: Path, samples: list[tuple[str, list[tuple[str, bytes]]]], per_shard: int, reproducible: bool
) -> None:
    """webdataset.TarWriter with the writer's guarantees added around it (.partial, fsync, rename).

    ``reproducible``: mtime 0 and empty owner names (the settings our writer fixes); otherwise its defaults
    (mtime = now, owner 'bigdata'). The mtime must be an int: TarWriter ignores its ``format`` argument and
    opens a pax tar, which stores a float mtime (0.0 too) as an extra pax header block per member.
    """
    settings = {"mtime": 0, "user": "", "group": ""} if reproducible else {}
    directory.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, len(samples), per_shard)):
        final = directory / f"train-{number:06d}.tar"
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        with open(partial, "wb") as handle:
            with wds.TarWriter(handle, encoder=False, **settings) as writer:
                for key, members in samples[start : start + per_shard]:
                    writer.write({"__key__": key, **dict(members)})
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, final)
    fsync_dir(directory)


def digest(directory: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(directory.glob("*.tar")):
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def writer_determinism(
    root: Path, samples: list[tuple[str, list[tuple[str, bytes]]]], per_shard: int
) -> None:
    ordered = [(key, sorted(members)) for key, members in samples]  # TarWriter writes members sorted by name
    runs = {
        "ours, prepare's member order (png, cls, json)": lambda d: write_ours(d, samples, per_shard),
        "ours, members sorted by name": lambda d: write_ours(d, ordered, per_shard),
        "TarWriter, mtime 0, no owner names": lambda d: write_webdataset(d, samples, per_shard, True),
        "TarWriter, defaults": lambda d: write_webdataset(d, samples, per_shard, False),
    }
    print("\n### Writer output bytes (sha256 of the shards, two runs each, 1.1 s apart)\n")
    print("| writer | run 1 | run 2 | identical |")
    print("|---|---|---|---|")
    for name, run in runs.items():
        hashes = []
        for attempt in range(2):
            out = root / f"det-{abs(hash(name))}-{attempt}"
            run(out)
            hashes.append(digest(out))
            time.sleep(1.1)  # tar mtimes have 1 s resolution
        print(f"| {name} | {hashes[0]} | {hashes[1]} | {'yes' if hashes[0] == hashes[1] else 'NO'} |")


# ---------------------------------------------------------------- (b) PNG


def png_sides(
    images: list[np.ndarray],
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]]]:
    def pil_encode(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=PNG_LEVEL)
        return buffer.getvalue()

    encode = {
        "ours (Up rows, libdeflate 1)": lambda: [encode_member(im, "png", PNG_LEVEL) for im in images],
        f"PIL (adaptive filters, zlib {PNG_LEVEL})": lambda: [pil_encode(im) for im in images],
    }
    ours_png = [encode_member(im, "png", PNG_LEVEL) for im in images]
    pil_png = [pil_encode(im) for im in images]
    decode = {
        "ours on ours (inflate + cumsum)": lambda: [decode_png_grey(b) for b in ours_png],
        "PIL on ours": lambda: [decode_png_with_pil(b) for b in ours_png],
        "PIL on PIL's": lambda: [decode_png_with_pil(b) for b in pil_png],
    }
    try:
        import cv2

        encode["cv2"] = lambda: [
            cv2.imencode(".png", im, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL]) for im in images
        ]
        decode["cv2 on ours"] = lambda: [
            cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE) for b in ours_png
        ]
    except ImportError:
        print("(cv2 not installed: no OpenCV rows)")
    sizes = (np.mean([len(b) for b in ours_png]) / 1e3, np.mean([len(b) for b in pil_png]) / 1e3)
    print(f"PNG size: ours {sizes[0]:.1f} KB, PIL {sizes[1]:.1f} KB per slice (mean)")
    return encode, decode


# ---------------------------------------------------------------- (c) reader


def to_tensor(pair: tuple[np.ndarray, int]) -> tuple[torch.Tensor, int]:
    pixels, label = pair
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).unsqueeze(0), label


def reader_sides(urls: list[str]) -> dict[str, Callable[[], object]]:
    def drain(pipeline: Iterable[object]) -> int:
        return sum(1 for _ in pipeline)

    def ours() -> int:
        return drain(
            wds.DataPipeline(wds.SimpleShardList(urls), tarfile_to_samples(), wds.map(labelled_image))
        )

    def stock() -> int:
        dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        return drain(dataset.decode("l").to_tuple("png", "cls").map(to_tensor))

    def stock_tar_our_decode() -> int:
        return drain(
            wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.map(labelled_image))
        )

    def our_tar_pil_decode() -> int:
        return drain(
            wds.DataPipeline(
                wds.SimpleShardList(urls),
                tarfile_to_samples(),
                wds.decode("l"),
                wds.to_tuple("png", "cls"),
                wds.map(to_tensor),
            )
        )

    return {
        STOCK: stock,
        "ours (tar_samples + png_codec)": ours,
        "stock tar + our decode": stock_tar_our_decode,
        "our tar + PIL decode": our_tar_pil_decode,
    }


# ---------------------------------------------------------------- (d) context


def train_step_cost(
    images: list[np.ndarray], batch: int, steps: int, rounds: int
) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per sample of resnet18 1-channel 64-px SGD steps, per round."""
    import timm
    import torch.nn.functional as F

    pixels = torch.from_numpy(np.stack(images[: batch * 2])).unsqueeze(1).float().div_(127.5).sub_(1.0)
    pixels = F.interpolate(pixels, size=(64, 64), mode="bilinear", antialias=True)
    batches = [(pixels[i * batch : (i + 1) * batch], torch.arange(batch) % 4) for i in range(2)]
    out = []
    for _ in range(rounds):
        torch.manual_seed(0)
        network = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=4)
        optimiser = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)

        def step(x: torch.Tensor, y: torch.Tensor, network=network, optimiser=optimiser) -> None:
            loss = F.cross_entropy(network(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

        for x, y in batches * 2:  # warm-up
            step(x, y)
        wall, cpu = timed(lambda: [step(*batches[i % 2]) for i in range(steps)])
        out.append((wall / (steps * batch), cpu / (steps * batch)))
    return out


def prepare_cost(files: int) -> tuple[float, float, float, int] | None:
    """CPU s per slice of prepare's per-file work (one parse: headers, decode, LUT, scaling, resize, PNG encode,
    hashes), of the PNG encode inside it, and of the bare pydicom decode + resize loop, on real DICOM files
    (alternating file by file); and the slices written. None without the real corpus."""
    import prepare as prepare_bench

    from modality.intensity.pipeline import Preprocess
    from modality.readers import read_headers_keeping_file
    from modality.readers.dicom import PREFERRED_PLUGINS
    from modality.records import InputItem, RejectedInput
    from modality.shards import work

    root = shared_data_root()
    if not (root / "manifest.csv").exists():
        return None
    preprocess = Preprocess.from_dict({"image_size": 224, "aspect": "pad", "colour": "grey"})
    encode_cpu = [0.0]
    plain_encode = work.encode_member

    def counted_encode(*args: object, **kwargs: object) -> bytes:
        started = time.process_time()
        member = plain_encode(*args, **kwargs)
        encode_cpu[0] += time.process_time() - started
        return member

    work.encode_member = counted_encode
    prepare_cpu = bare_cpu = 0.0
    slices = 0
    try:
        for _, path in prepare_bench.pick_files(root, files):
            bare_cpu += timed(lambda path=path: prepare_bench.bare_loop([path], 224, PREFERRED_PLUGINS))[1]
            started = time.process_time()
            try:
                headers, decode = read_headers_keeping_file(
                    InputItem(path=path, dataset="bench", kind="dicom")
                )
            except RejectedInput:
                continue
            job = work.DecodeJob(
                headers[0].item, tuple(h.index for h in headers), headers[0].modality, preprocess
            )
            result, _ = work.run_job(job, decode)
            prepare_cpu += time.process_time() - started
            slices += sum("offset" in s for s in result["slices"])
    finally:
        work.encode_member = plain_encode
    if not slices:
        return None
    return prepare_cpu / slices, encode_cpu[0] / slices, bare_cpu / slices, slices


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=DEFAULT_PREPARED)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--png-slices", type=int, default=400)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--prepare-files", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; lscpu model name: {model}")
    print(cpu_banner())
    print(f"torch.backends.cpu.get_cpu_capability(): {torch.backends.cpu.get_cpu_capability()}")
    print(f"load average {os.getloadavg()[0]:.1f}, niceness {os.nice(0)}, webdataset {wds.__version__}")

    try:
        data = load_samples(args.prepared, args.samples)
        print(f"{len(data)} samples from {args.prepared}/shards (prepare-written PNG members, real JSON)")
    except FileNotFoundError:
        data = phantom_samples(args.samples)
    samples = [
        (f"{i:020x}", [("png", png), ("cls", cls), ("json", meta)])
        for i, (_, png, cls, meta) in enumerate(data)
    ]
    images = [pixels for pixels, _, _, _ in data]

    with tempfile.TemporaryDirectory(prefix="shard-io-") as tmp:
        root = Path(tmp)
        counter = iter(range(10**6))

        def fresh() -> Path:
            return root / f"w{next(counter)}"

        writes = interleaved(
            {
                "ours (ShardWriter)": lambda: write_ours(fresh(), samples, args.per_shard),
                TARWRITER: lambda: write_webdataset(fresh(), samples, args.per_shard, True),
            },
            args.repeats,
        )
        print_table(f"(a) writing {len(samples)} samples", writes, len(samples), "sample")
        writer_determinism(root, samples[:200], 100)

        encode, decode = png_sides(images[: args.png_slices])
        encodes = interleaved(encode, args.repeats)
        print_table(f"(b) PNG encode, {args.png_slices} slices 224x224", encodes, args.png_slices, "slice")
        decodes = interleaved(decode, args.repeats)
        print_table(f"(b) PNG decode, {args.png_slices} slices 224x224", decodes, args.png_slices, "slice")

        shard_dir = root / "read"
        write_ours(shard_dir, samples, args.per_shard)
        urls = [str(p) for p in sorted(shard_dir.glob("*.tar"))]
        reads = interleaved(reader_sides(urls), args.repeats)
        print_table(
            f"(c) reading {len(samples)} samples to (uint8 tensor, label), page cache warm",
            reads,
            len(samples),
            "sample",
        )

    print("\n### (d) what limits the paths (CPU ms per sample, 1 torch thread)\n")
    train = train_step_cost(images, 32, args.train_steps, 3)
    step_ms = 1e3 * statistics.median(c for _, c in train)
    print(
        f"- resnet18 64 px train step (timm, SGD, batch 32): {step_ms:.2f} CPU ms/sample "
        f"(rounds {', '.join(f'{1e3 * c:.2f}' for _, c in train)})"
    )
    n, m = len(samples), args.png_slices
    ours_read, stock_read = cpu_ms(reads, "ours (tar_samples + png_codec)", n), cpu_ms(reads, STOCK, n)
    print(
        f"- CPU training, loader in the training process (num_workers=0, as on 2 cores): reading is "
        f"{100 * ours_read / (step_ms + ours_read):.1f}% of a sample's CPU with ours, "
        f"{100 * stock_read / (step_ms + stock_read):.1f}% with stock webdataset; ours speeds the whole step "
        f"up by {100 * ((step_ms + stock_read) / (step_ms + ours_read) - 1):.1f}%"
    )
    costs = prepare_cost(args.prepare_files)
    if costs is None:
        print("- prepare: real corpus not found (or nothing written), skipped")
        return 0
    per_slice, encode_ms, bare, slices = costs
    per_slice, encode_ms, bare = 1e3 * per_slice, 1e3 * encode_ms, 1e3 * bare
    print(
        f"- prepare per-file work, single pass ({slices} slices written from {args.prepare_files} real DICOM "
        f"files): {per_slice:.2f} CPU ms/slice, of which PNG encode {encode_ms:.3f}; bare pydicom "
        f"decode + resize on the same files {bare:.2f}"
    )
    pil_encode = cpu_ms(encodes, f"PIL (adaptive filters, zlib {PNG_LEVEL})", m)
    ours_encode = cpu_ms(encodes, "ours (Up rows, libdeflate 1)", m)
    print(
        f"- prepare with PIL's encoder instead of ours: +{pil_encode - ours_encode:.3f} CPU ms/slice, "
        f"+{100 * (pil_encode - ours_encode) / per_slice:.1f}% of prepare's per-slice CPU"
    )
    ours_write = cpu_ms(writes, "ours (ShardWriter)", n)
    lib_write = cpu_ms(writes, TARWRITER, n)
    shares = []
    for workers in (1, 4, 16):
        # Decoding runs in the workers; the write pass runs afterwards in the parent, one core.
        ours_wall, lib_wall = per_slice / workers + ours_write, per_slice / workers + lib_write
        shares.append(f"{workers} workers +{100 * (lib_wall / ours_wall - 1):.1f}%")
    print(
        "- prepare wall time with webdataset.TarWriter instead of ours (the write pass is serial, after the "
        f"decode workers): {', '.join(shares)}"
    )
    return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
