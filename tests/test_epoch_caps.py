"""Per-epoch caps (`data.epoch_caps`): all samples stay in the shards; each epoch draws a balanced subset."""

from __future__ import annotations

import json
import math
import tarfile
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from tiny_shards import CLASSES, _member, encode, sample_ids, tiny_image

from modality.data import ModalityDataModule
from modality.data.stages import (
    EpochCapSampler,
    StreamPosition,
    epoch_cap_index,
    series_keep_probabilities,
)

# (dataset, class, series sizes): src_a CT is over its cap with uneven series, src_a MR is under it,
# src_b CT is one big series, src_b XR is a class with no cap.
GROUPS = [
    ("src_a", "CT", [40, 20, 4]),
    ("src_a", "MR", [6, 4]),
    ("src_b", "CT", [30]),
    ("src_b", "XR", [50]),
]
CAPS = {"CT": 16, "MR": 16}
EXPECTED = {("src_a", "CT"): 16.0, ("src_a", "MR"): 10.0, ("src_b", "CT"): 16.0, ("src_b", "XR"): 50.0}


def records() -> list[tuple[str, str, str, str]]:
    """(key, dataset, class, series) for every sample of GROUPS, keys numbered in order."""
    rows = []
    for dataset, cls, sizes in GROUPS:
        for s, size in enumerate(sizes):
            rows += [(f"{len(rows) + i:020x}", dataset, cls, f"{dataset}.{cls}.{s}") for i in range(size)]
    return rows


def write_grouped_shards(out: Path, shards: int = 8, image_size: int = 16) -> list[tuple[str, str, str, str]]:
    """Train shards holding GROUPS' samples round-robin (pixels carry the sample number), one val shard."""
    rows = records()
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"train-{i:06d}.tar" for i in range(shards)]
    with ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(out / "shards" / name, "w")) for name in names]
        for sample_id, (key, dataset, cls, series) in enumerate(rows):
            label = CLASSES.index(cls)
            tar = tars[sample_id % shards]
            meta = {"dataset": dataset, "class": cls, "series_uid": series, "sample_id": sample_id}
            _member(tar, f"{key}.png", encode(tiny_image(sample_id, label, image_size, rng), "png"))
            _member(tar, f"{key}.cls", str(label).encode("ascii"))
            _member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
    with tarfile.open(out / "shards" / "val-000000.tar", "w") as tar:
        for i in range(4):
            key = f"{10_000 + i:020x}"
            _member(tar, f"{key}.png", encode(tiny_image(10_000 + i, 0, image_size, rng), "png"))
            _member(tar, f"{key}.cls", b"0")
            _member(tar, f"{key}.json", json.dumps({"dataset": "v", "class": "CT"}).encode())
    counts = Counter(sample_id % shards for sample_id in range(len(rows)))
    by_class = Counter(cls for _, _, cls, _ in rows)
    summary = {
        "classes": CLASSES,
        "image_size": image_size,
        "preprocess": {"image_size": image_size, "scaling": {"method": "percentile"}},
        "splits": {
            "train": {
                "samples": len(rows),
                "shards": [{"name": n, "samples": counts[i]} for i, n in enumerate(names)],
                "by_class": {c: by_class.get(c, 0) for c in CLASSES},
            },
            "val": {
                "samples": 4,
                "shards": [{"name": "val-000000.tar", "samples": 4}],
                "by_class": {"CT": 4},
            },
        },
        "stats": {"train": {"mean01": 0.4, "std01": 0.2}},
    }
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return rows


def make_module(data_dir: Path, **kwargs) -> ModalityDataModule:
    module = ModalityDataModule(str(data_dir), prepare_dataset=None, shuffle_buffer=16, **kwargs)
    module._position = lambda: StreamPosition()  # type: ignore[method-assign]  # no trainer attached
    module.setup("fit")
    return module


def test_series_quotas_fill_small_series_first_and_sum_to_the_cap() -> None:
    probabilities = series_keep_probabilities([2, 10, 100], 30)
    assert probabilities == pytest.approx([1.0, 1.0, 18 / 100])  # quota 10 -> 14 -> 18 as small series fill
    assert sum(p * n for p, n in zip(probabilities, [2, 10, 100], strict=True)) == pytest.approx(30)
    even = series_keep_probabilities([50, 50, 50, 50], 40)
    assert even == pytest.approx([0.2] * 4)
    assert series_keep_probabilities([3, 4], 10) == [1.0, 1.0]
    with pytest.raises(ValueError, match="positive"):
        series_keep_probabilities([3], 0)


def test_index_expects_the_cap_per_capped_group_and_everything_elsewhere() -> None:
    index = epoch_cap_index(records(), CAPS)
    assert index.samples == 154
    assert index.expected_samples == pytest.approx(sum(EXPECTED.values()))
    assert index.expected_by_class == pytest.approx({"CT": 32.0, "MR": 10.0, "XR": 50.0})
    groups = {key: (dataset, cls) for key, dataset, cls, _ in records()}
    assert {groups[key] for key in index.keep} == {("src_a", "CT"), ("src_b", "CT")}
    with pytest.raises(ValueError, match="positive"):
        epoch_cap_index(records(), {"CT": 0})


def draw_epochs(epochs: int, seed: int = 0, start_epoch: int = 0) -> list[list[str]]:
    index = epoch_cap_index(records(), CAPS)
    sampler = EpochCapSampler(index.keep, seed, StreamPosition(), start_epoch)
    samples = [{"__key__": key} for key, *_ in records()]
    return [[s["__key__"] for s in sampler(iter(samples))] for _ in range(epochs)]


def test_per_epoch_draws_match_caps_balance_series_and_use_every_sample() -> None:
    rows = records()
    group_of = {key: (dataset, cls) for key, dataset, cls, _ in rows}
    series_of = {key: series for key, _, _, series in rows}
    epochs = draw_epochs(400)
    per_group = Counter(group_of[key] for epoch in epochs for key in epoch)
    for group, expected in EXPECTED.items():
        assert per_group[group] / len(epochs) == pytest.approx(expected, rel=0.05), group
    # src_a CT: series of 40, 20, 4 -> the 4 are always kept, the others share 12 as 6 + 6.
    per_series = Counter(series_of[key] for epoch in epochs for key in epoch)
    assert per_series["src_a.CT.2"] == 4 * len(epochs)
    for name in ("src_a.CT.0", "src_a.CT.1"):
        assert per_series[name] / len(epochs) == pytest.approx(6.0, rel=0.08), name
    # Draws differ between epochs, and over a few dozen epochs every slice is used.
    assert epochs[0] != epochs[1]
    assert {key for epoch in epochs[:60] for key in epoch} == set(group_of)


def test_draws_repeat_for_a_seed_and_resume_mid_run() -> None:
    assert draw_epochs(3) == draw_epochs(3)
    assert draw_epochs(3, seed=1) != draw_epochs(3)
    assert draw_epochs(1, start_epoch=2) == draw_epochs(3)[2:]


def test_datamodule_epoch_is_the_expected_kept_count_and_every_sample_is_seen(tmp_path: Path) -> None:
    rows = write_grouped_shards(tmp_path)
    module = make_module(tmp_path, batch_size=8, epoch_caps=CAPS)
    expected = round(sum(EXPECTED.values()))  # 92, not the 154 samples in the shards
    assert module.train_samples_per_epoch() == expected
    assert module.train_batches_per_rank() == math.ceil(expected / 8)
    assert module.train_class_counts() == [32, 10, 0, 50]
    loader = module.train_dataloader()
    assert len(loader) == math.ceil(expected / 8)
    group_of = {i: (dataset, cls) for i, (_, dataset, cls, _) in enumerate(rows)}
    epochs = [[i for images, _ in loader for i in sample_ids(images.numpy())] for _ in range(100)]
    assert all(len(epoch) == math.ceil(expected / 8) * 8 for epoch in epochs)
    # Shards are resampled with replacement, so a slice kept with p = 0.15 needs a few dozen epochs.
    assert {i for epoch in epochs for i in epoch} == set(group_of)
    # The index's keys are the loader's keys: the capped groups shrink to their share of the epoch
    # (had no key matched, src_a CT would be 64 / 154 = 42% of the draws instead of 16 / 92 = 17%).
    shares = Counter(group_of[i] for epoch in epochs for i in epoch)
    total = sum(shares.values())
    for group, count in EXPECTED.items():
        assert shares[group] / total == pytest.approx(count / expected, rel=0.25), group

    # A fresh module with the same seed replays the same batches.
    def first_epoch() -> list[list[int]]:
        loader = make_module(tmp_path, batch_size=8, epoch_caps=CAPS).train_dataloader()
        return [sample_ids(images.numpy()) for images, _ in loader]

    assert first_epoch() == first_epoch()


def test_without_caps_nothing_changes(tmp_path: Path) -> None:
    write_grouped_shards(tmp_path)
    module = make_module(tmp_path, batch_size=8)
    assert module.epoch_cap_index() is None
    assert module.train_samples_per_epoch() == 154
    assert module.train_class_counts() == [94, 10, 0, 50]
    with pytest.raises(ValueError, match="positive"):
        ModalityDataModule(str(tmp_path), prepare_dataset=None, epoch_caps={"CT": 0})


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_run_equal_epochs_of_disjoint_capped_draws(tmp_path: Path, workers: int) -> None:
    rows = write_grouped_shards(tmp_path)
    group_of = {i: (dataset, cls) for i, (_, dataset, cls, _) in enumerate(rows)}
    seen: list[set[int]] = []
    drawn: Counter = Counter()
    for rank in range(2):
        module = ModalityDataModule(
            str(tmp_path),
            prepare_dataset=None,
            shuffle_buffer=16,
            batch_size=8,
            epoch_caps=CAPS,
            num_workers=workers,
            persistent_workers=False,
        )
        module._position = lambda rank=rank: StreamPosition(rank, 2)  # type: ignore[method-assign]
        module.setup("fit")
        loader = module.train_dataloader()
        epochs = [[i for images, _ in loader for i in sample_ids(images.numpy())] for _ in range(4)]
        # ceil(92 / (8 x 2 ranks)) = 6 batches per rank, also as 3 + 3 from two workers.
        assert [len(epoch) for epoch in epochs] == [48] * 4
        seen.append({i for epoch in epochs for i in epoch})
        drawn.update(group_of[i] for epoch in epochs for i in epoch)
    assert not seen[0] & seen[1], "ranks must see disjoint samples"
    # Capped in every worker: src_a CT (64 slices, cap 16) is drawn about a third as often as uncapped
    # src_b XR (50 slices); without the caps it would be drawn more often.
    assert drawn[("src_a", "CT")] < 0.6 * drawn[("src_b", "XR")]
