"""The webdataset stages of the shard loader, each a small callable on an iterator of samples.

Seeds: every stream (one per DDP rank x DataLoader worker) seeds its shard resampling, its epoch-cap draws
and its shuffle buffer from ``(base seed, rank, worker, epoch, torch.initial_seed())``. Ranks and workers
must draw different shards, and non-persistent workers are re-created from a pickled copy each epoch (their
own epoch counter restarts), so the per-iterator seed PyTorch gives every worker is mixed in to keep epochs
different while ``seed_everything`` keeps whole runs reproducible.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info

from modality.data.tar_samples import tarfile_to_samples
from modality.shards.decode import SampleDecodeError, decode_class, decode_npy_uint8, decode_png_grey

Sample = dict[str, Any]
LabelledImage = tuple[torch.Tensor, int]
#: An image with its class and its body-part head region index (-1: unknown, masked out of the loss).
RegionLabelledImage = tuple[torch.Tensor, int, int]
#: Region index of a sample whose region is unknown (or not one of the head's regions).
UNKNOWN_REGION = -1


@dataclass(frozen=True)
class StreamPosition:
    """Which DDP rank this pipeline copy feeds; DataLoader worker info is read at iteration time."""

    rank: int = 0
    world_size: int = 1


def worker_index() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running now; (0, 1) in the main process."""
    info = get_worker_info()
    if info is None:
        return 0, 1
    return info.id, info.num_workers


def stream_seed(base_seed: int, position: StreamPosition, epoch: int) -> int:
    """A seed unique to this rank, worker and epoch, reproducible under ``seed_everything``."""
    worker, _ = worker_index()
    # Inside a worker, torch.initial_seed() is drawn per DataLoader iterator from the main process RNG.
    iterator_seed = torch.initial_seed() if get_worker_info() is not None else 0
    return hash((base_seed, position.rank, worker, epoch, iterator_seed)) & 0x7FFF_FFFF


class ResampledShardUrls:
    """Endless stream of shard URLs drawn with replacement, seeded per rank/worker/epoch.

    Resampling (not splitting a fixed list) is what lets every rank and worker run for the same number of
    batches however uneven the shards are: nothing runs dry before the epoch length is reached.
    """

    def __init__(
        self, urls: Sequence[str], seed: int, position: StreamPosition, start_epoch: int = 0
    ) -> None:
        if not urls:
            raise ValueError("no training shards to resample from")
        self.urls = list(urls)
        self.seed = seed
        self.position = position
        # A resumed run starts its counter at the resumed epoch, so it draws what the uninterrupted run drew.
        self.epoch = start_epoch - 1

    def __call__(self) -> Iterator[Sample]:
        self.epoch += 1
        rng = random.Random(stream_seed(self.seed, self.position, self.epoch))
        while True:
            yield {"url": rng.choice(self.urls)}


def ordered_shard_urls(urls: Sequence[str]) -> Callable[[], Iterator[Sample]]:
    """Each evaluation shard once, split across DataLoader workers by position (shard i -> worker i % n)."""

    def source() -> Iterator[Sample]:
        worker, workers = worker_index()
        for url in list(urls)[worker::workers]:
            yield {"url": url}

    return source


def rank_shard_pool(urls: Sequence[str], position: StreamPosition) -> tuple[list[str], bool]:
    """The shards this rank resamples from, and whether samples must also be split by key.

    With at least as many shards as ranks, each rank resamples only from its own shards ``urls[rank::world]``,
    so ranks see disjoint samples and none reads another's data. With fewer shards than ranks (tiny pools),
    every rank resamples all shards and keeps only the samples whose key hashes to it
    (:func:`keep_rank_keys`). Either way ``with_epoch`` then gives every rank the same batch count.
    """
    if position.world_size <= 1:
        return list(urls), False
    if len(urls) >= position.world_size:
        return list(urls)[position.rank :: position.world_size], False
    return list(urls), True


def keep_rank_keys(position: StreamPosition) -> Callable[[Iterable[Sample]], Iterator[Sample]]:
    """Keep the samples whose key's CRC32 modulo world size is this rank (identity-based, so a resampled
    shard read twice still gives each sample to the same rank)."""

    def stage(samples: Iterable[Sample]) -> Iterator[Sample]:
        for sample in samples:
            if zlib.crc32(str(sample.get("__key__", "")).encode()) % position.world_size == position.rank:
                yield sample

    return stage


def keep_rank_share(position: StreamPosition) -> Callable[[Iterable[Sample]], Iterator[Sample]]:
    """Keep the samples ``j`` of this worker's stream with ``j % world_size == rank``.

    Every rank reads the same shards in the same worker split, so the ranks' shares are disjoint and cover
    every evaluation sample exactly once, with no padding or duplicated samples skewing the metrics. Ranks may
    then hold one batch more or less than each other, which is safe because evaluation runs no per-step
    collective (metrics sync once, at epoch end).
    """

    def stage(samples: Iterable[Sample]) -> Iterator[Sample]:
        for index, sample in enumerate(samples):
            if index % position.world_size == position.rank:
                yield sample

    return stage


def series_keep_probabilities(series_sizes: Sequence[int], cap: float) -> list[float]:
    """Per-series keep probabilities that give one (dataset, class) group an expected ``cap`` samples.

    Water filling: every series gets an equal quota ``q`` of the cap; a series smaller than ``q`` keeps all
    its slices (probability 1) and the quota it leaves unused is shared among the larger ones, so
    ``sum(min(size, q)) == cap`` and a larger series keeps each slice with probability ``q / size``.
    A group of at most ``cap`` samples keeps everything.
    """
    if cap <= 0:
        raise ValueError(f"an epoch cap must be positive, got {cap}")
    sizes = [int(size) for size in series_sizes]
    if any(size <= 0 for size in sizes):
        raise ValueError(f"series sizes must be positive, got {sizes}")
    if sum(sizes) <= cap:
        return [1.0] * len(sizes)
    remaining, open_series = float(cap), len(sizes)
    quota = remaining / open_series
    for size in sorted(sizes):
        quota = remaining / open_series
        if size > quota:
            break
        remaining -= size
        open_series -= 1
    return [1.0 if size <= quota else quota / size for size in sizes]


@dataclass(frozen=True)
class EpochCapIndex:
    """Keep probabilities of the training samples under per-epoch caps (:func:`epoch_cap_index`).

    ``keep`` holds only the samples kept with probability below 1 (keyed by ``__key__``); every other
    sample is always kept. ``expected_samples`` is the expected number kept per epoch over all samples,
    ``expected_by_class`` the same per class, ``samples`` the number indexed.
    """

    keep: dict[str, float]
    expected_samples: float
    expected_by_class: dict[str, float]
    samples: int


def epoch_cap_index(samples: Iterable[tuple[str, str, str, str]], caps: Mapping[str, float]) -> EpochCapIndex:
    """Keep probabilities for ``(key, dataset, class, series)`` records under ``caps`` (class -> cap).

    Each (dataset, class) group larger than its class's cap gets an expected ``cap`` samples per epoch,
    spread evenly over its series (:func:`series_keep_probabilities`); classes not in ``caps`` are uncapped.
    Computed once; which samples an epoch keeps is drawn by :class:`EpochCapSampler`.
    """
    for name, cap in caps.items():
        if cap is None or float(cap) <= 0:
            raise ValueError(f"epoch cap of {name} must be a positive number, got {cap!r}")
    groups: dict[tuple[str, str], dict[str, list[str]]] = {}
    by_class: dict[str, float] = {}
    count = 0
    for key, dataset, cls, series in samples:
        count += 1
        groups.setdefault((dataset, cls), {}).setdefault(series, []).append(key)
    keep: dict[str, float] = {}
    expected_total = 0.0
    for (_, cls), series_keys in sorted(groups.items()):
        members = list(series_keys.values())
        cap = caps.get(cls)
        if cap is None:
            probabilities = [1.0] * len(members)
        else:
            probabilities = series_keep_probabilities([len(keys) for keys in members], float(cap))
        for keys, probability in zip(members, probabilities, strict=True):
            if probability < 1.0:
                keep.update(dict.fromkeys(keys, probability))
            expected = probability * len(keys)
            expected_total += expected
            by_class[cls] = by_class.get(cls, 0.0) + expected
    return EpochCapIndex(keep, expected_total, by_class, count)


class EpochCapSampler:
    """Keep each sample with its probability from an :class:`EpochCapIndex`, drawn afresh every epoch.

    The draws come from a generator seeded per stream and epoch like :class:`ShuffleBuffer`, so runs repeat
    under ``seed_everything``, a resumed run draws what the uninterrupted one drew, and over epochs every
    slice of a capped group is used. Placed before the shuffle buffer (and after the rank split), it works
    on each rank's and worker's own stream; samples missing from the index are always kept.
    """

    def __init__(
        self, keep: Mapping[str, float], seed: int, position: StreamPosition, start_epoch: int = 0
    ) -> None:
        self.keep = dict(keep)
        self.seed = seed
        self.position = position
        self.epoch = start_epoch - 1

    def __call__(self, samples: Iterable[Sample]) -> Iterator[Sample]:
        self.epoch += 1
        if not self.keep:
            yield from samples
            return
        rng = random.Random(stream_seed(self.seed + 2, self.position, self.epoch))
        for sample in samples:
            probability = self.keep.get(str(sample.get("__key__", "")), 1.0)
            if probability >= 1.0 or rng.random() < probability:
                yield sample


class ShuffleBuffer:
    """Shuffle within a bounded buffer, seeded per stream and epoch like the shard resampling."""

    def __init__(self, buffer_size: int, seed: int, position: StreamPosition, start_epoch: int = 0) -> None:
        self.buffer_size = buffer_size
        self.seed = seed
        self.position = position
        self.epoch = start_epoch - 1

    def __call__(self, samples: Iterable[Sample]) -> Iterator[Sample]:
        self.epoch += 1
        if self.buffer_size <= 1:
            yield from samples
            return
        rng = random.Random(stream_seed(self.seed + 1, self.position, self.epoch))
        buffer: list[Sample] = []
        for sample in samples:
            if len(buffer) < self.buffer_size:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            yield buffer[index]
            buffer[index] = sample
        rng.shuffle(buffer)
        yield from buffer


def labelled_image(sample: Sample) -> LabelledImage:
    """``(image (1, H, W) uint8, class index)`` from one tar sample (members decoded by
    :mod:`modality.shards.decode`, the one decoder of our shard format); errors name the sample key."""
    key = sample.get("__key__", "?")
    try:
        if "png" in sample:
            pixels = decode_png_grey(sample["png"])
        elif "npy" in sample:
            pixels = decode_npy_uint8(sample["npy"])
        else:
            raise SampleDecodeError("no .png or .npy member")
        if "cls" not in sample:
            raise SampleDecodeError("no .cls member")
        label = decode_class(sample["cls"])
    except SampleDecodeError as error:
        raise SampleDecodeError(f"sample {key!r} from {sample.get('__url__', '?')}: {error}") from error
    # np.array copies the (possibly read-only, buffer-backed) pixels into memory the tensor may own.
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).unsqueeze(0), label


def region_decoder(regions: Sequence[str]) -> Callable[[Sample], RegionLabelledImage]:
    """``labelled_image`` plus the sample's head-region index from its JSON ``region`` (-1 when unknown).

    Only the body-part head asks for it: parsing the JSON member costs a few microseconds per sample, which
    the default (image, class) batches do not pay. A sample without a JSON member or a ``region`` field
    (shards prepared before issue 16) raises, naming the sample: prepare the data again.
    """
    from modality.shards.decode import decode_json

    index = {name: i for i, name in enumerate(regions)}

    def decode(sample: Sample) -> RegionLabelledImage:
        image, label = labelled_image(sample)
        meta = decode_json(sample["json"]) if "json" in sample else None
        if not isinstance(meta, dict) or "region" not in meta:
            raise SampleDecodeError(
                f"sample {sample.get('__key__', '?')!r} from {sample.get('__url__', '?')}: no region in its "
                "JSON member (shards prepared before the body-part labels): prepare the data again"
            )
        return image, label, index.get(str(meta["region"]), UNKNOWN_REGION)

    return decode


def collate_images(batch: list[LabelledImage]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 images (float conversion happens after transfer, 4x fewer bytes through workers)."""
    images = torch.stack([image for image, _ in batch])
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    return images, labels


def collate_with_regions(batch: list[RegionLabelledImage]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`collate_images` plus the region indices (long, -1 = unknown)."""
    images = torch.stack([image for image, _, _ in batch])
    labels = torch.tensor([label for _, label, _ in batch], dtype=torch.long)
    regions = torch.tensor([region for _, _, region in batch], dtype=torch.long)
    return images, labels, regions


def batch_samples(
    batch_size: int, partial: bool, regions: bool = False
) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """Batch inside the dataset so ``with_epoch`` counts batches, the unit DDP ranks must agree on;
    ``regions``: samples from :func:`region_decoder`, batches ``(images, labels, regions)``."""
    return wds.batched(
        batch_size, collation_fn=collate_with_regions if regions else collate_images, partial=partial
    )


def samples_from_tars(handler: Callable[[Exception], bool] = wds.reraise_exception) -> Any:
    """The tar -> sample stage (swappable: a faster local-tar reader can replace this one line)."""
    return tarfile_to_samples(handler=handler)


def eval_pipeline(
    urls: Sequence[str], position: StreamPosition, decoder: Callable[[Sample], Any], batcher: Any
) -> wds.DataPipeline:
    """A split read for evaluation: each shard once, in order (split across DataLoader workers by position),
    this rank's share of its samples, decoded by ``decoder`` and batched by ``batcher``. The one way a
    split is read for scoring: the DataModule's val/test loaders and ``eval.py``'s test-split predictions
    (which decodes with metadata) both build it here."""
    return wds.DataPipeline(
        ordered_shard_urls(urls),
        samples_from_tars(),
        keep_rank_share(position),
        wds.map(decoder),
        batcher,
    )
