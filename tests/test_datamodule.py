"""ModalityDataModule: epoch lengths, rank splits, decoding and normalisation, on tiny hand-made shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_shards import sample_ids, write_tiny_shards

from modality.data import ModalityDataModule
from modality.data.batch_transforms import (
    augment_batch,
    normalize_01,
    padded_ct_look,
    pet_from_ct,
    pet_from_mr,
)
from modality.data.datamodule import batches_per_worker, train_batches_per_rank
from modality.data.stages import StreamPosition, rank_shard_pool


def make_module(data_dir: Path, position: StreamPosition | None = None, **kwargs) -> ModalityDataModule:
    module = ModalityDataModule(str(data_dir), prepare_dataset=None, shuffle_buffer=16, **kwargs)
    module._position = lambda: position or StreamPosition()  # type: ignore[method-assign]  # stand-in for an attached trainer
    module.setup("fit")
    return module


def ids_of(loader) -> list[list[int]]:
    return [sample_ids(images.numpy()) for images, _ in loader]


def test_epoch_length_counts_batches_per_rank_and_worker() -> None:
    assert train_batches_per_rank(100, 8, 1) == 13
    assert train_batches_per_rank(100, 8, 2) == 7
    assert batches_per_worker(7, 2) == 4
    with pytest.raises(ValueError, match="no samples"):
        train_batches_per_rank(0, 8, 1)


def test_train_loader_yields_equal_full_batches_on_every_rank_even_with_uneven_shards(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path, {"train": [40, 6, 18], "val": [8]})
    per_rank = []
    for rank in range(2):
        module = make_module(tmp_path, StreamPosition(rank, 2), batch_size=4)
        batches = ids_of(module.train_dataloader())
        assert len(module.train_dataloader()) == len(batches) == 8  # ceil(64 / (4 * 2))
        assert all(len(batch) == 4 for batch in batches)
        per_rank.append({i for batch in batches for i in batch})
    assert not per_rank[0] & per_rank[1], "ranks must see disjoint samples"


def test_fewer_shards_than_ranks_split_samples_by_key(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path, {"train": [30], "val": [8]})
    pool, by_key = rank_shard_pool(["only.tar"], StreamPosition(1, 2))
    assert pool == ["only.tar"] and by_key
    seen = [
        {
            i
            for b in ids_of(make_module(tmp_path, StreamPosition(r, 2), batch_size=3).train_dataloader())
            for i in b
        }
        for r in range(2)
    ]
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_epochs_differ_but_runs_repeat(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path, {"train": [20, 20], "val": [4]})
    loader = make_module(tmp_path, batch_size=8).train_dataloader()
    first, second = ids_of(loader), ids_of(loader)
    assert first != second
    assert ids_of(make_module(tmp_path, batch_size=8).train_dataloader()) == first


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_counts_every_sample_exactly_once_across_ranks(tmp_path: Path, workers: int) -> None:
    write_tiny_shards(tmp_path, {"train": [8], "val": [9, 5, 3]})
    seen: list[int] = []
    batch_counts = []
    for rank in range(2):
        batches = ids_of(
            make_module(tmp_path, StreamPosition(rank, 2), batch_size=4, num_workers=workers).val_dataloader()
        )
        batch_counts.append(len(batches))
        seen += [i for batch in batches for i in batch]
    assert sorted(seen) == list(range(8, 25))


def test_npy_members_decode_like_png(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path / "png", {"train": [6], "val": [5]}, image_format="png", seed=3)
    write_tiny_shards(tmp_path / "npy", {"train": [6], "val": [5]}, image_format="npy", seed=3)
    png = next(iter(make_module(tmp_path / "png", batch_size=8).val_dataloader()))
    npy = next(iter(make_module(tmp_path / "npy", batch_size=8).val_dataloader()))
    assert png[0].dtype == torch.uint8 and png[0].shape == (5, 1, 32, 32)
    assert torch.equal(png[0], npy[0]) and torch.equal(png[1], npy[1])


def test_batches_are_normalised_and_resized_on_the_device_side(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path, {"train": [8], "val": [8]})
    module = make_module(tmp_path, batch_size=8, image_size=16, normalize="standardize")
    images, labels = next(iter(module.val_dataloader()))
    inputs, same_labels = module.on_after_batch_transfer((images, labels), 0)
    assert inputs.shape == (8, 1, 16, 16) and inputs.dtype == torch.float32
    assert torch.equal(labels, same_labels)
    info = module.data_info()
    assert info["input_size"] == 16 and info["classes"] == ["CT", "MR", "PT", "XR"]
    stats = json.loads((tmp_path / "summary.json").read_text())["stats"]["train"]
    assert info["mean01"] == pytest.approx(stats["mean01"])
    x01 = torch.tensor([0.0, 1.0])
    assert normalize_01(x01, "minus_one_one", 0, 1).tolist() == [-1.0, 1.0]


def test_augmentation_keeps_shape_and_range() -> None:
    x01 = torch.rand(6, 1, 20, 20)
    out = augment_batch(
        x01, {"hflip": 0.5, "rotate_deg": 10, "scale": 0.1, "brightness": 0.1, "contrast": 0.1}
    )
    assert out.shape == x01.shape and out.min() >= 0 and out.max() <= 1
    flipped = augment_batch(x01, {"hflip": 1.0})
    assert torch.allclose(flipped, x01.flip(-1), atol=1e-5)


def test_intensity_augmentation_changes_pixels_but_keeps_range_and_order() -> None:
    x01 = torch.linspace(0, 1, 6 * 20 * 20).view(6, 1, 20, 20)
    gamma_only = augment_batch(x01, {"gamma": 0.5}, torch.Generator().manual_seed(0))
    assert gamma_only.shape == x01.shape and gamma_only.min() >= 0 and gamma_only.max() <= 1
    assert not torch.allclose(gamma_only, x01, atol=1e-3)
    # a gamma curve is monotone: it changes the display, never which pixel is brighter
    assert (gamma_only.flatten(1).diff(dim=1) >= 0).all()  # the input increases along the flattened image
    blurred = augment_batch(x01 * 0 + (torch.arange(20) % 2).float(), {"blur": 1.0})
    assert blurred.std() < 0.5 * (torch.arange(20) % 2).float().std()
    noisy = augment_batch(x01, {"noise": 0.1}, torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.allclose(noisy, x01)
    again = augment_batch(x01, {"noise": 0.1}, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)


def test_gaussian_blur_has_a_per_image_width_and_keeps_the_mean() -> None:
    from modality.data.batch_transforms import gaussian_blur

    impulse = torch.zeros(3, 1, 21, 21)
    impulse[:, :, 10, 10] = 1.0
    out = gaussian_blur(impulse, torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.ones(3), atol=1e-5)  # no mass lost away from edges
    # spread (second moment) along one axis is sigma**2 once sigma spans a few samples (3-sigma support)
    rows = out[:, 0].sum(dim=2)
    variance = (rows * (torch.arange(21) - 10.0) ** 2).sum(dim=1)
    assert variance[0] < variance[1] < variance[2]
    assert torch.allclose(variance[1:], torch.tensor([1.0, 4.0]), rtol=0.05)
    flat = torch.full((2, 1, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([1.0, 3.0])), flat, atol=1e-6)  # replicate edges
    wide = augment_batch(impulse, {"blur": 1.0, "blur_sigma": 2.0}, torch.Generator().manual_seed(0))
    peaks = wide.amax(dim=(1, 2, 3))
    assert (peaks < 0.95).all() and len(set(peaks.tolist())) == 3 and wide.min() >= 0  # each its own sigma


def test_missing_shards_without_prepare_is_a_clear_error(tmp_path: Path) -> None:
    module = ModalityDataModule(str(tmp_path / "nowhere"), prepare_dataset=None)
    module.prepare_data()
    with pytest.raises(FileNotFoundError, match="prepare"):
        module.setup("fit")


def test_explicit_urls_must_match_the_summary(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path, {"train": [4, 4], "val": [4]})
    module = ModalityDataModule(str(tmp_path), prepare_dataset=None, urls={"train": ["a.tar"]})
    with pytest.raises(ValueError, match="1 URLs"):
        module.split_shards("train")
    templated = ModalityDataModule(
        str(tmp_path), prepare_dataset=None, shard_url_template="pipe:cat /s/{name}"
    )
    assert templated.split_shards("val").urls == ("pipe:cat /s/val-000000.tar",)


def test_train_splits_union_trains_on_every_listed_split(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path, {"train": [12], "val": [8], "test": [4]})  # ids 0-11, 12-19, 20-23
    loader = make_module(tmp_path, batch_size=4).train_dataloader()
    only_train = {i for _ in range(3) for b in ids_of(loader) for i in b}
    assert only_train <= set(range(12))
    module = make_module(tmp_path, batch_size=4, train_splits=["train", "val", "test"])
    assert module.train_shards().samples == 24
    loader = module.train_dataloader()
    assert len(loader) == 6
    seen = {i for _ in range(3) for b in ids_of(loader) for i in b}
    assert seen & set(range(12, 20)) and seen & set(range(20, 24)), "val and test samples must be trained on"
    # Class counts for balanced loss weights cover exactly the splits trained on.
    summary = json.loads((tmp_path / "summary.json").read_text())["splits"]
    by_split = {
        s: [summary[s]["by_class"].get(c, 0) for c in module.classes] for s in ("train", "val", "test")
    }
    assert make_module(tmp_path).data_info()["train_class_counts"] == by_split["train"]
    union = [sum(counts) for counts in zip(*by_split.values(), strict=True)]
    assert module.data_info()["train_class_counts"] == union and sum(union) == 24
    with pytest.raises(ValueError, match="unknown split"):
        make_module(tmp_path, train_splits=["train", "holdout"]).train_shards()
    with pytest.raises(ValueError, match="distinct"):
        make_module(tmp_path, train_splits=["train", "train"])


def test_pet_from_mr_is_smooth_stretched_and_repeatable() -> None:
    """A synthetic brain PET keeps the slice's layout but loses its edges, and is stretched as prepare would."""
    rng = torch.Generator().manual_seed(0)
    head = torch.zeros(2, 1, 64, 64)
    head[:, :, 16:48, 16:48] = 0.6
    head[:, :, 28:36, 28:36] = 1.0  # a sharp bright square inside a sharp grey one
    head += 0.05 * torch.rand(head.shape, generator=rng)
    pet = pet_from_mr(head, torch.Generator().manual_seed(1))
    again = pet_from_mr(head, torch.Generator().manual_seed(1))
    assert pet.shape == head.shape and torch.equal(pet, again)
    assert pet.min() >= 0.0 and pet.max() == 1.0  # the 99th percentile and above read 1
    edges = (head[..., 1:] - head[..., :-1]).abs().max()
    assert (pet[..., 1:] - pet[..., :-1]).abs().max() < 0.3 * edges  # no edge survives a ~2-4.5% blur
    assert pet[:, :, 32, 32].min() > pet[:, :, 20, 20].max()  # what was brighter stays brighter
    assert pet[:, :, 2, 2].max() < 0.05  # and the background stays dark


def _ct_phantom(
    side: int, centre: float, body: float, bone: tuple[float, float], count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` copies of a stored CT phantom (air 0, a soft-tissue disc of radius ``body`` at 0.5, a bone ring
    between the radii ``bone`` at 1.0) and each pixel's distance from ``centre``."""
    yy, xx = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    radius = ((yy - centre) ** 2 + (xx - centre) ** 2).sqrt()
    ct = torch.zeros(side, side)
    ct[radius < body] = 0.5
    ct[(radius > bone[0]) & (radius < bone[1])] = 1.0
    return ct.expand(count, 1, side, side).clone(), radius


def test_pet_from_ct_lights_soft_tissue_dims_bone_and_air_and_is_noisy() -> None:
    """A CT phantom: air 0, a body disc of soft tissue at 0.5, a bone ring at 1.0 inside it."""
    batch, radius = _ct_phantom(side=96, centre=48.0, body=40, bone=(14, 18), count=48)
    pet = pet_from_ct(batch, torch.Generator().manual_seed(3))
    assert pet.shape == batch.shape and pet.min() >= 0.0 and pet.max() == 1.0
    assert torch.equal(pet, pet_from_ct(batch, torch.Generator().manual_seed(3)))  # repeatable
    soft = pet[..., (radius > 22) & (radius < 36)].mean()
    bone = pet[..., (radius > 15) & (radius < 17)].mean()
    air = pet[..., radius > 44].mean()
    assert soft > bone > air and air < 0.1  # FDG: soft tissue over bone, air dark
    inside = pet[..., (radius > 22) & (radius < 36)]
    assert inside.std(dim=-1).mean() > 0.05  # counting noise, not a flat disc
    empty = pet_from_ct(torch.zeros(2, 1, 32, 32), torch.Generator().manual_seed(0))  # no body: no failure
    assert empty.shape == (2, 1, 32, 32) and torch.isfinite(empty).all()


def test_padded_ct_look_greys_the_air_blackens_the_corners_and_keeps_the_order() -> None:
    """A black-air CT phantom (air 0, body 0.5, bone 1.0) comes out as a padded scanner's picture: air lifted into
    0.25-0.6 inside the circle, the corners 0, tissue above air and bone still the brightest."""
    batch, radius = _ct_phantom(side=64, centre=31.5, body=20, bone=(8, 10), count=16)
    out = padded_ct_look(batch, torch.Generator().manual_seed(0))
    assert torch.equal(out, padded_ct_look(batch, torch.Generator().manual_seed(0)))  # repeatable
    air = out[..., (radius > 24) & (radius < 28)]
    assert ((air >= 0.25) & (air <= 0.6)).all()
    assert (air.std(dim=-1) == 0).all() and air[:, 0, 0].unique().numel() > 8  # one lift per image, varied
    assert (out[..., radius > 32.5] == 0).all()  # outside the largest circle: padding
    body = out[..., (radius > 12) & (radius < 18)]
    bone = out[..., (radius > 8.5) & (radius < 9.5)]
    assert (body.min(dim=-1).values > air.max(dim=-1).values).all()
    assert (bone.min(dim=-1).values == 1.0).all()  # 1.0 stays 1.0 after a + (1 - a) x
    assert padded_ct_look(torch.zeros(0, 1, 8, 8)).shape == (0, 1, 8, 8)


def test_ct_padding_look_changes_only_training_ct_pictures_and_no_label(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path, {"train": [8], "val": [8]})
    images = torch.full((400, 1, 16, 16), 40, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3] * 100)
    classes = ["CT", "MR", "PT", "XR"]
    module = make_module(tmp_path, batch_size=8, ct_padding_look=0.5)
    out = module._with_padded_ct_look(images, labels, classes)
    changed = (out != images).flatten(1).any(dim=1)
    assert (labels[changed] == 0).all() and 30 <= int(changed.sum()) <= 70  # about half of the 100 CT
    assert torch.equal(
        images, torch.full((400, 1, 16, 16), 40, dtype=torch.uint8)
    )  # the batch is not modified
    assert (out[changed][..., 0, 0] == 0).all()  # corners black, the inside lifted above 40
    assert (out[changed][..., 8, 8] > 40).all()
    always = make_module(tmp_path, batch_size=8, ct_padding_look=1.0)
    assert (always._with_padded_ct_look(images, labels, classes) != images).flatten(1).any(dim=1).sum() == 100
    assert make_module(tmp_path, batch_size=8)._with_padded_ct_look(images, labels, ["MR", "XR"]) is images
    with pytest.raises(ValueError, match="probability"):
        make_module(tmp_path, ct_padding_look=1.5)


def _relabelled_at_half(tmp_path: Path, option: str, source: int):
    """A module with ``option`` = 0.5 relabels about half of the 100 slices of class ``source`` as PT and nothing
    else; returns the batch it was given, what it made, and the rows it changed."""
    write_tiny_shards(tmp_path, {"train": [8], "val": [8]})
    images = torch.randint(0, 256, (400, 1, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3] * 100)
    module = make_module(tmp_path, batch_size=8, **{option: 0.5})
    out, new = module._with_synthetic_pet(images, labels, ["CT", "MR", "PT", "XR"])
    changed = new != labels
    assert (labels[changed] == source).all() and (new[changed] == 2).all()  # only that class, always to PT
    assert 30 <= int(changed.sum()) <= 70  # about half of its 100 slices
    assert torch.equal(out[~changed], images[~changed])
    return images, labels, out, changed


def test_synthetic_pet_ct_relabels_only_training_ct_and_leaves_the_mr_stream_alone(tmp_path: Path) -> None:
    images, labels, _, _ = _relabelled_at_half(tmp_path, "synthetic_pet_ct", source=0)
    with pytest.raises(ValueError, match="probability"):
        make_module(tmp_path, synthetic_pet_ct=-0.1)
    classes = ["CT", "MR", "PT", "XR"]
    # synthetic_pet_ct = 0 draws nothing: the MR path's draws are those of a run without the option
    plain = make_module(tmp_path, batch_size=8, synthetic_pet=0.5)
    with_zero = make_module(tmp_path, batch_size=8, synthetic_pet=0.5, synthetic_pet_ct=0.0)
    a, b = (
        plain._with_synthetic_pet(images, labels, classes),
        with_zero._with_synthetic_pet(images, labels, classes),
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    both = make_module(tmp_path, batch_size=8, synthetic_pet=1.0, synthetic_pet_ct=1.0)
    assert set(both._with_synthetic_pet(images, labels, classes)[1].tolist()) == {2, 3}


def test_synthetic_pet_relabels_only_training_mr_at_its_rate(tmp_path: Path) -> None:
    images, labels, out, changed = _relabelled_at_half(tmp_path, "synthetic_pet", source=1)
    with pytest.raises(ValueError, match="probability"):
        make_module(tmp_path, synthetic_pet=1.5)
    classes = ["CT", "MR", "PT", "XR"]
    assert not torch.equal(out[changed], images[changed])
    assert torch.equal(labels, torch.tensor([0, 1, 2, 3] * 100))  # the caller's batch is not modified
    always = make_module(tmp_path, batch_size=8, synthetic_pet=1.0)
    assert (always._with_synthetic_pet(images, labels, classes)[1] != 1).all()
    _, kept = always._with_synthetic_pet(images, labels, ["CT", "MR", "XR"])  # no PT class: nothing to make
    assert torch.equal(kept, labels)
    # outside training (no trainer, or validation) the batch reaches the model as read
    batch = next(iter(always.val_dataloader()))
    assert torch.equal(always.on_after_batch_transfer(batch, 0)[1], batch[1])
