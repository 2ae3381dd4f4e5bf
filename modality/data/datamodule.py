"""``ModalityDataModule``: streams prepare's WebDataset shards into DDP-safe batches.

Train: resampled shards (each rank from its own shards, see ``rank_shard_pool``) -> tar samples -> per-epoch
caps (``epoch_caps``: each sample kept with its precomputed probability, drawn afresh every epoch) -> shuffle
buffer -> decode -> batches inside the dataset, cut by ``with_epoch`` to the same number of batches on every
rank and worker. Uneven shards would otherwise give
ranks different batch counts and DDP hangs in the gradient all-reduce until the process-group timeout
(measured: 38 vs 32 batches, both ranks blocked for 30 min).

Val/test: every rank reads every shard in order and keeps its ``j % world == rank`` share, so each sample is
counted exactly once across ranks without padding; ranks may differ by one batch, which is safe because
evaluation logs only epoch-level metrics (no per-step collective).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from modality.data.batch_transforms import (
    NORMALIZATIONS,
    BatchAugment,
    equalize_mode,
    input_channels,
    model_inputs,
    padded_ct_look,
    pet_from_ct,
    pet_from_mr,
)
from modality.data.stages import (
    EpochCapIndex,
    EpochCapSampler,
    ResampledShardUrls,
    ShuffleBuffer,
    StreamPosition,
    batch_samples,
    epoch_cap_index,
    eval_pipeline,
    keep_rank_keys,
    labelled_image,
    rank_shard_pool,
    region_decoder,
    samples_from_tars,
)
from modality.data.value_rows import ValueRow, value_row
from modality.shards.listing import SplitShards, plan_split, read_summary


def summary_is_present(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` already holds built shards (prepare's own check when it is importable)."""
    try:
        from modality.prepare import is_prepared
    except ImportError:
        return (Path(data_dir) / "summary.json").is_file()
    return bool(is_prepared(data_dir))


def train_batches_per_rank(samples: int, batch_size: int, world_size: int) -> int:
    """Batches each rank runs per epoch so that all ranks together see about one pass over ``samples``."""
    if samples <= 0:
        raise ValueError("the train split holds no samples")
    return max(1, math.ceil(samples / (batch_size * world_size)))


def batches_per_worker(batches_per_rank: int, num_workers: int) -> int:
    """``with_epoch`` counts per DataLoader worker; round up so the rank total is never short."""
    return math.ceil(batches_per_rank / max(1, num_workers))


def _probability(name: str, value: float) -> float:
    """``value`` as a float, refused with its name unless it is a probability."""
    chance = float(value)
    if not 0.0 <= chance <= 1.0:
        raise ValueError(f"{name} is a probability and must be in [0, 1], got {value}")
    return chance


def _drawn_rows(
    labels: torch.Tensor, class_index: int, chance: float, generator: torch.Generator
) -> torch.Tensor:
    """Which rows of a batch are of class ``class_index`` and drawn with probability ``chance`` (one draw per row,
    whatever its class, so the stream does not depend on the batch's labels)."""
    draw = torch.rand(len(labels), generator=generator)
    return (labels.cpu() == class_index) & (draw < chance)


def _remade(
    stored: torch.Tensor,
    make: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    generator: torch.Generator,
) -> torch.Tensor:
    """Stored 0-255 pictures through a picture maker that works on [0, 1], back in the stored dtype."""
    return make(stored.float().div(255.0), generator).mul(255.0).round().to(stored.dtype)


class ModalityDataModule(pl.LightningDataModule):
    """Shards of ``data_dir`` (``summary.json`` + ``shards/``) as uint8 batches, normalised on the device.

    Args:
        data_dir: prepare's output directory.
        batch_size: per-rank training batch size (the effective batch is ``batch_size * world_size``).
        num_workers: DataLoader workers (0 is fastest on 2 cores, measured).
        normalize: ``minus_one_one`` or ``standardize`` (exact train statistics from summary.json).
        image_size: model input side; batches are resized on the device when it differs from the stored size.
        shuffle_buffer: samples held by the training shuffle buffer.
        augment: a :class:`modality.data.batch_transforms.BatchAugment` (what the config's ``_target_`` builds),
            or a mapping of its knobs (checked the same way: an unknown key is an error); None, or every knob
            at 0, is no augmentation. Applied to training batches only (``augment_batch``).
        samples_per_epoch: defines an epoch's length instead of the train split's size (or, with
            ``epoch_caps``, instead of the expected number of samples the caps keep).
        prepare_dataset: dataset pool built with ``python -m modality.prepare`` when ``data_dir`` is empty.
        urls / shard_url_template: shard locations other than ``data_dir/shards`` (http(s), ``pipe:``).
        train_splits: the splits training reads (default ``train``; see :meth:`train_shards`).
        epoch_caps: class -> expected samples per epoch of each (source dataset, class) group, e.g.
            ``{CT: 80, MR: 80, PT: 80}``; classes not named are uncapped, null switches caps off. Every sample
            stays in the shards: each epoch draws a balanced subset, spread evenly over each group's series
            (:func:`modality.data.stages.epoch_cap_index`), so over epochs every slice is used. An epoch then
            lasts the expected kept count. The value head (:meth:`train_value_features`) is not capped: it
            is fitted on every sample that has physical units.
        body_part: batches also carry each sample's body-part head region index, ``(images, labels,
            regions)`` with -1 for unknown (the JSON ``region`` prepare records), and ``data_info`` names the
            regions; the config sets it from ``model.body_part``. Off: batches and their cost as before.
        synthetic_pet: probability that a training MR slice is turned into a brain-PET-like picture and
            labelled PT (:func:`modality.data.batch_transforms.pet_from_mr`), before the augmentation (so
            exports of it are simulated too); 0 is off. Why: the only brain PET of the shared corpus is one
            source, so a fold that holds it out has never seen brain PET, and the CNN called it MR (recall
            0.13). Measured under LOGO at 0.3 (docs/results.md): that source 0.13 -> 1.00, but the CNN reads
            15 of the other 18 sources worse and the fused decision drops 0.980 -> 0.963; at 0.1 the CNN alone
            rises 0.576 -> 0.722 but one source's radiographs fall below 0.80 fused, against the rule set before
            that run; on the means of two seeds fused pooled drops 0.981 -> 0.969 and fo-dicom falls below 0.80
            (the nested fusion learns to trust the CNN on PET), so it stays off. Draws come from a generator
            seeded by ``seed``, apart from the augmentation's.
        synthetic_pet_ct: the same for training CT slices, turned into whole-body-PET-like pictures
            (:func:`modality.data.batch_transforms.pet_from_ct`): the corpus's only whole-body PET is one
            study, so a fold that holds it out reads body PET as MR. 0 is off (and draws nothing, so runs
            without it keep their random streams). Under LOGO at 0.1 (seed 0) the held-out body PET was still
            read as MR (1 of 270) and the CNN alone fell 0.562 -> 0.551: off.
        ct_padding_look: probability that a training CT slice is shown as a scanner storing undeclared padding
            outside its reconstruction circle gives it (:func:`modality.data.batch_transforms.padded_ct_look`:
            air grey, corners black), label unchanged. Why: the corpus's grey-air CT comes almost all from one
            source group, so a fold holding it out calls grey-air CT X-ray; making all air black at prepare
            (``scaling.padding_gap``) moved the CT/MR boundary instead. 0 is off and draws nothing (its own
            generator, so the other options' streams do not move when it is on). Under LOGO (seeds 0-3, at 0.5
            with ``synthetic_pet`` 0.1) the held-out OHIF group's CT went 64 -> 132 of 149 (seeds 0 and 1) and
            the CNN alone 0.562 -> 0.813, exports 0.373 -> 0.722, but fused 0.981 -> 0.977 and one 47-image
            source fell below the rule's 0.80 floor fused at every seed (0.773): off.
        equalize: the network reads each image histogram-equalised
            (:func:`modality.data.batch_transforms.equalize_batch`): invariant to any increasing intensity
            curve, which is most of what differs between sites and between DICOM and an 8-bit export. Stored in
            ``data_info`` so evaluation and ``eval.py input=`` read images the same way. Off: under LOGO (seed
            0, noise augmentation off) the CNN alone read CT far better (recall 0.49 -> 0.88) but MR and
            simulated exports worse (0.81 -> 0.70; 0.377 -> 0.313), against the rule set before the run.
            ``"both"``: two input channels, the picture and its equalised copy (the network reads both;
            ``data.augment.channel_dropout`` makes it learn each alone too). Off too: under LOGO (seed 0,
            channel dropout 0.3) the CNN alone fell to 0.558 pooled and exports to 0.307.
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 128,
        num_workers: int = 0,
        normalize: str = "minus_one_one",
        image_size: int | None = None,
        shuffle_buffer: int = 2000,
        augment: BatchAugment | Mapping[str, Any] | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        samples_per_epoch: int | None = None,
        prepare_dataset: str | None = "demo",
        prepare_overrides: Sequence[str] = (),
        eval_batch_size: int | None = None,
        seed: int = 0,
        urls: Mapping[str, Sequence[str]] | None = None,
        shard_url_template: str | None = None,
        summary_path: str | None = None,
        train_splits: Sequence[str] = ("train",),
        epoch_caps: Mapping[str, float] | None = None,
        body_part: bool = False,
        synthetic_pet: float = 0.0,
        synthetic_pet_ct: float = 0.0,
        equalize: bool | str = False,
        ct_padding_look: float = 0.0,
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize '{normalize}', expected one of {NORMALIZATIONS}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data_dir = str(data_dir)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.normalize = normalize
        self.image_size = int(image_size) if image_size else None
        self.shuffle_buffer = int(shuffle_buffer)
        self.augment = BatchAugment.from_config(augment)
        self.synthetic_pet = _probability("synthetic_pet", synthetic_pet)
        self.synthetic_pet_ct = _probability("synthetic_pet_ct", synthetic_pet_ct)
        self.ct_padding_look = _probability("ct_padding_look", ct_padding_look)
        self._synthetic_generator = torch.Generator().manual_seed(int(seed) + 7919)
        self._padding_generator = torch.Generator().manual_seed(int(seed) + 104729)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.samples_per_epoch = samples_per_epoch
        self.prepare_dataset = prepare_dataset
        self.prepare_overrides = tuple(prepare_overrides)
        self.seed = int(seed)
        self.urls = {split: list(values) for split, values in (urls or {}).items()}
        self.shard_url_template = shard_url_template
        self.summary_path = summary_path or str(Path(self.data_dir) / "summary.json")
        self.train_splits = tuple(str(split) for split in train_splits)
        if not self.train_splits or len(set(self.train_splits)) != len(self.train_splits):
            raise ValueError(f"train_splits must name distinct splits, got {list(train_splits)}")
        self.epoch_caps = {str(name): float(cap) for name, cap in (epoch_caps or {}).items()}
        for name, cap in self.epoch_caps.items():
            if not cap > 0:
                raise ValueError(f"epoch_caps.{name} must be positive, got {cap}")
        self.body_part = bool(body_part)
        self.equalize = equalize_mode(equalize)
        self._summary: dict[str, Any] | None = None
        self._data_info: dict[str, Any] | None = None
        self._epoch_cap_index: EpochCapIndex | None = None
        self._value_rows_cache: tuple[tuple[str, ...], list[tuple[ValueRow, int]]] | None = None

    # ----------------------------------------------------------------- data on disk
    def prepare_data(self) -> None:
        """Build the demo (or the configured pool) once, on local rank 0, when the shards are missing."""
        if self.prepare_dataset is None:
            return
        from modality.prepare import build_in_subprocess

        if not summary_is_present(self.data_dir):
            print(f"[modality] no shards in {self.data_dir}: building dataset '{self.prepare_dataset}'")
        # Also when present: prepare then checks that the stored preprocessing is the requested one and
        # refuses stale shards (a few seconds of start-up), instead of training on them silently.
        build_in_subprocess(self.prepare_dataset, self.data_dir, self.prepare_overrides)

    @property
    def summary(self) -> dict[str, Any]:
        if self._summary is None:
            self._summary = read_summary(self.summary_path)
        return self._summary

    @property
    def classes(self) -> list[str]:
        return list(self.summary["classes"])

    @property
    def regions(self) -> list[str]:
        """The body-part head's regions (``summary.json["regions"]``); raises for shards prepared without them."""
        regions = self.summary.get("regions")
        if not regions:
            raise ValueError(
                f"{self.summary_path} records no body-part regions (prepared before issue 16's region labels): "
                "prepare the data again into a new out_dir (or delete this one) to train with model.body_part=true"
            )
        return [str(r) for r in regions]

    def _decoder(self) -> Any:
        """The sample decoder of the loaders: (image, class), or (image, class, region) with ``body_part``."""
        return region_decoder(self.regions) if self.body_part else labelled_image

    def split_shards(self, split: str) -> SplitShards:
        return plan_split(
            self.summary,
            split,
            Path(self.data_dir) / "shards",
            url_template=self.shard_url_template,
            urls=self.urls.get(split),
        )

    def train_shards(self) -> SplitShards:
        """The shards training reads: the ``train`` split, or the union of ``train_splits``.

        Training on more than ``train`` is for a final model refitted on every source once a recipe has been
        measured on unseen ones; its validation and test figures then describe seen data.
        """
        parts = [self.split_shards(split) for split in self.train_splits]
        if len(parts) == 1:
            return parts[0]
        return SplitShards(
            "+".join(self.train_splits),
            tuple(url for part in parts for url in part.urls),
            tuple(count for part in parts for count in part.samples_per_shard),
        )

    def data_info(self) -> dict[str, Any]:
        """Plain-type facts the model stores in its checkpoint to rebuild this exact preprocessing."""
        if self._data_info is None:
            self._data_info = self._read_data_info()
        return dict(self._data_info)

    def _read_data_info(self) -> dict[str, Any]:
        stats = self.summary.get("stats", {}).get("train", {})
        stored_size = int(
            self.summary.get("image_size", self.summary.get("preprocess", {}).get("image_size", 0))
        )
        regions = (
            {"regions": self.regions, "train_region_counts": self.train_region_counts()}
            if self.body_part
            else {}
        )
        # Absent when off, so a model trained without it stores the data_info it always stored.
        equalize: dict[str, Any] = {"equalize": self.equalize} if self.equalize else {}
        channels = input_channels(equalize)
        if channels != 1:  # what the model builds its first convolution for
            equalize["input_channels"] = channels
        return {
            **regions,
            **equalize,
            "classes": self.classes,
            "preprocess": dict(self.summary.get("preprocess", {})),
            "normalize": self.normalize,
            "mean01": float(stats.get("mean01", 0.5)),
            "std01": float(stats.get("std01", 0.5)),
            "input_size": self.image_size or stored_size,
            "stored_size": stored_size,
            "train_class_counts": self.train_class_counts(),
        }

    def train_value_features(self) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of every sample of the splits training reads, from the shards' JSON and ``cls``
        members (the images are skipped), for :class:`modality.models.value_head.ValueStatsHead`: only samples
        whose values have physical units (DICOM, volumes; :func:`modality.models.fusion.has_physical_units`).

        Raises ``ValueError`` naming the shard when a sample has no ``value_features`` (shards prepared
        before they were recorded: prepare again).
        """
        rows = self._train_unit_rows()
        return (
            np.asarray([row.features for row, _ in rows], dtype=np.float32),
            np.asarray([label for _, label in rows], dtype=np.int64),
        )

    def train_value_sources(self) -> list[str]:
        """The dataset of each row of :meth:`train_value_features`, in the same order: the value head's fit
        weighs sources alike within a class (:func:`modality.models.value_head.sources_alike`)."""
        return [row.dataset for row, _ in self._train_unit_rows()]

    def _train_unit_rows(self) -> list[tuple[ValueRow, int]]:
        """The training rows with physical units: the one filter both value-head inputs read, so the
        features and their sources stay aligned row for row."""
        return [(row, label) for row, label in self._train_value_rows() if row.units]

    def train_exported_radiographs(self, radiograph_class: int) -> np.ndarray:
        """The value statistics of the training samples of class index ``radiograph_class`` that have no
        physical units (8-bit PNG/JPEG radiographs): the head never answers them as they are, but learns
        from them as DICOM radiographs (:func:`modality.intensity.value_stats.as_detector_radiographs`)."""
        rows = [
            row.features
            for row, label in self._train_value_rows()
            if not row.units and label == radiograph_class
        ]
        return np.asarray(rows, dtype=np.float32)

    def _train_value_rows(self) -> list[tuple[ValueRow, int]]:
        """(recorded value row, class index) of every training sample, read once per list of training shards
        (the value head's fit asks twice: rows with units, then the 8-bit radiographs); a sample without
        ``value_features`` raises ``ValueError`` naming its shard."""
        from modality.shards.decode import decode_class, decode_json

        urls = tuple(self.train_shards().urls)
        if self._value_rows_cache is None or self._value_rows_cache[0] != urls:
            rows = [
                (
                    value_row(str(sample.get("__key__")), decode_json(sample["json"]), url),
                    decode_class(sample["cls"]),
                )
                for url, sample in self._train_meta_samples()
            ]
            self._value_rows_cache = (urls, rows)
        return self._value_rows_cache[1]

    def _train_meta_samples(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(shard url, sample) for every sample of the training shards, JSON and ``cls`` members only
        (local shards skip the image bytes; remote ones are read whole by webdataset)."""
        from modality.data.tar_samples import local_path_of, tar_samples

        for url in self.train_shards().urls:
            if local_path_of(url) is not None:
                samples = tar_samples(
                    [{"url": url}], select_files=lambda name: name.endswith((".json", ".cls"))
                )
            else:
                samples = iter(wds.WebDataset([url], shardshuffle=False))
            for sample in samples:
                yield url, sample

    def epoch_cap_index(self) -> EpochCapIndex | None:
        """Per-sample keep probabilities under ``epoch_caps`` (None when off), built once from the training
        shards' JSON members (``dataset``, ``class``, ``series_uid``; a sample with no series UID counts as
        its own source file's series). Deterministic, so every DDP rank and worker builds the same index."""
        if not self.epoch_caps:
            return None
        if self._epoch_cap_index is None:
            from modality.shards.decode import decode_json

            def records() -> Iterator[tuple[str, str, str, str]]:
                for url, sample in self._train_meta_samples():
                    key = str(sample.get("__key__", ""))
                    meta = decode_json(sample["json"]) if "json" in sample else None
                    if not isinstance(meta, dict) or "dataset" not in meta or "class" not in meta:
                        raise ValueError(
                            f"{url}: sample {key} has no JSON member with dataset and class, which "
                            "data.epoch_caps needs; prepare the data again or set data.epoch_caps=null"
                        )
                    series = meta.get("series_uid") or meta.get("source_path") or key
                    yield key, str(meta["dataset"]), str(meta["class"]), str(series)

            self._epoch_cap_index = epoch_cap_index(records(), self.epoch_caps)
        return self._epoch_cap_index

    def train_class_counts(self) -> list[int]:
        """Samples per class (in ``classes`` order) over the splits training reads (summary.json counts);
        with ``epoch_caps``, the expected samples per class an epoch keeps (what the loss sees), rounded."""
        index = self.epoch_cap_index()
        if index is not None:
            return [round(index.expected_by_class.get(name, 0.0)) for name in self.classes]
        return self._train_split_counts("by_class", self.classes)

    def train_region_counts(self) -> list[int]:
        """Samples per head region (in ``regions`` order) over the splits training reads (summary.json's
        ``by_region``; unknown is not a head region and is left out)."""
        return self._train_split_counts("by_region", self.regions)

    def _train_split_counts(self, field: str, names: Sequence[str]) -> list[int]:
        """summary.json's ``splits.<split>.<field>`` counts of ``names``, summed over ``train_splits``."""
        splits = self.summary.get("splits", {})
        return [
            sum(int(splits.get(split, {}).get(field, {}).get(name, 0)) for split in self.train_splits)
            for name in names
        ]

    def setup(self, stage: str | None = None) -> None:
        """Read summary.json early so a missing or malformed one fails before the first batch."""
        if not Path(self.summary_path).is_file() and self.prepare_dataset is None:
            raise FileNotFoundError(
                f"no shards at {self.data_dir} and data.prepare_dataset is null: run python -m modality.prepare"
            )
        _ = self.summary

    def _position(self) -> StreamPosition:
        trainer = self.trainer
        if trainer is None:
            return StreamPosition()
        return StreamPosition(rank=trainer.global_rank, world_size=trainer.world_size)

    # ----------------------------------------------------------------- loaders
    def train_samples_per_epoch(self) -> int:
        """Samples all ranks together draw per epoch: ``samples_per_epoch`` when set, else the expected
        count the epoch caps keep, else the training shards' total."""
        if self.samples_per_epoch:
            return int(self.samples_per_epoch)
        index = self.epoch_cap_index()
        if index is not None:
            return max(1, round(index.expected_samples))
        return self.train_shards().samples

    def train_batches_per_rank(self) -> int:
        position = self._position()
        return train_batches_per_rank(self.train_samples_per_epoch(), self.batch_size, position.world_size)

    def _epoch_cap_stage(
        self, seed: int, position: StreamPosition, start_epoch: int
    ) -> EpochCapSampler | None:
        index = self.epoch_cap_index()
        if index is None or not index.keep:
            return None
        return EpochCapSampler(index.keep, seed, position, start_epoch)

    def train_dataloader(self) -> DataLoader:
        shards = self.train_shards()
        if shards.samples == 0:
            raise ValueError(f"the {shards.split} split in {self.summary_path} holds no samples")
        position = self._position()
        per_worker = batches_per_worker(self.train_batches_per_rank(), self.num_workers)
        # Epochs whose training pass finished (restored on resume, also from a checkpoint written at
        # train-epoch end before the epoch counted as completed): what Lightning gives samplers' set_epoch.
        start_epoch = (
            self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
        )
        pool, split_by_key = rank_shard_pool(shards.urls, position)
        pipeline = wds.DataPipeline(
            ResampledShardUrls(pool, self.seed, position, start_epoch),
            samples_from_tars(),
            keep_rank_keys(position) if split_by_key else None,  # DataPipeline skips None stages
            self._epoch_cap_stage(self.seed, position, start_epoch),
            ShuffleBuffer(self.shuffle_buffer, self.seed, position, start_epoch),
            wds.map(self._decoder()),
            batch_samples(self.batch_size, partial=False, regions=self.body_part),
        ).with_epoch(per_worker)
        pipeline = pipeline.with_length(per_worker * max(1, self.num_workers), silent=True)
        return self._loader(pipeline, self.num_workers)

    def calibration_batches(self, batches: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``batches`` training batches from a stream of its own (seeded by ``epoch``), read in this process.

        For re-estimating BatchNorm statistics before validation: a separate stream leaves the training
        stream's seeds untouched, so resumed runs still replay the uninterrupted run exactly. Always
        ``(images, labels)``: the BatchNorm re-estimation needs no regions.
        """
        shards = self.train_shards()
        position = self._position()
        pool, split_by_key = rank_shard_pool(shards.urls, position)
        pipeline = wds.DataPipeline(
            ResampledShardUrls(pool, self.seed + 7919, position, epoch),
            samples_from_tars(),
            keep_rank_keys(position) if split_by_key else None,
            self._epoch_cap_stage(self.seed + 7919, position, epoch),
            ShuffleBuffer(self.shuffle_buffer, self.seed + 7919, position, epoch),
            wds.map(labelled_image),
            batch_samples(self.batch_size, partial=False),
        )
        yield from itertools.islice(iter(pipeline), batches)

    def _eval_dataloader(self, split: str) -> DataLoader | list:
        shards = self.split_shards(split)
        if not shards.urls:
            warnings.warn(f"no {split} shards in {self.summary_path}", stacklevel=2)
            return []
        pipeline = eval_pipeline(
            shards.urls,
            self._position(),
            self._decoder(),
            batch_samples(self.eval_batch_size, partial=True, regions=self.body_part),
        )
        return self._loader(pipeline, min(self.num_workers, len(shards.urls)))

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_dataloader("test")

    def _loader(self, pipeline: wds.DataPipeline, num_workers: int) -> DataLoader:
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and num_workers > 0,
        )

    def _with_synthetic_pet(
        self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each MR sample, with probability ``synthetic_pet``, turned into a brain-PET-like picture, and each CT
        sample, with probability ``synthetic_pet_ct``, into a whole-body-PET-like one; both labelled PT."""
        if "PT" not in classes:
            return images, labels
        pt = classes.index("PT")
        out_images, out_labels = images, labels
        for source, chance, make in (
            ("MR", self.synthetic_pet, pet_from_mr),
            ("CT", self.synthetic_pet_ct, pet_from_ct),
        ):
            if chance <= 0 or source not in classes:
                continue
            chosen = _drawn_rows(labels, classes.index(source), chance, self._synthetic_generator)
            if not chosen.any():
                continue
            if out_images is images:
                out_images, out_labels = images.clone(), labels.clone()
            index = chosen.nonzero().flatten().to(images.device)
            out_images[index] = _remade(images[index], make, self._synthetic_generator)
            out_labels[index] = pt
        return out_images, out_labels

    def _with_padded_ct_look(
        self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]
    ) -> torch.Tensor:
        """Each CT sample, with probability ``ct_padding_look``, shown with grey air and black corners; the
        labels do not change."""
        if "CT" not in classes:
            return images
        chosen = _drawn_rows(labels, classes.index("CT"), self.ct_padding_look, self._padding_generator)
        if not chosen.any():
            return images
        out = images.clone()
        index = chosen.nonzero().flatten().to(images.device)
        out[index] = _remade(images[index], padded_ct_look, self._padding_generator)
        return out

    # ----------------------------------------------------------------- on the device
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels, *regions = batch  # regions: with body_part only
        info = self.data_info()
        training = self.trainer is not None and self.trainer.training
        if training and (self.synthetic_pet > 0 or self.synthetic_pet_ct > 0):
            images, labels = self._with_synthetic_pet(images, labels, info["classes"])
        if training and self.ct_padding_look > 0:
            images = self._with_padded_ct_look(images, labels, info["classes"])
        inputs = model_inputs(images, info, self.augment if training else None)
        return (inputs, labels, *regions)
