"""Histogram equalisation of the network's input (``data.equalize``): invariant to increasing intensity curves,
flat regions stay flat, and every path that feeds the model reads it from the checkpoint's ``data_info``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_shards import write_tiny_shards

from modality.data import ModalityDataModule
from modality.data.batch_transforms import equalize_batch, model_inputs, normalize_01, resize_batch


def levels_batch(seed: int, high: int = 100) -> torch.Tensor:
    """Four 24x24 images of integer levels in [0, high), a quarter of each a flat background at 0."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, high, size=(4, 1, 24, 24))
    images[:, :, :6, :] = 0
    return torch.from_numpy(images.astype(np.uint8))


def test_any_strictly_increasing_curve_gives_the_same_picture_exactly() -> None:
    images = levels_batch(0)
    rng = np.random.default_rng(1)
    curve = np.sort(rng.choice(256, size=100, replace=False)).astype(np.uint8)  # 100 levels -> 100 others
    assert np.all(np.diff(curve.astype(int)) > 0)
    curved = torch.from_numpy(curve[images.numpy()])
    assert not torch.equal(curved, images)
    assert torch.equal(equalize_batch(images.float() / 255), equalize_batch(curved.float() / 255))


def test_a_flat_background_stays_flat_at_the_middle_of_its_ranks() -> None:
    images = levels_batch(2).float() / 255
    out = equalize_batch(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    for image, equalised in zip(images, out, strict=True):
        zeros = image == 0
        background = equalised[zeros]
        assert torch.all(background == background[0])  # one value for the whole tie
        assert background[0].item() == pytest.approx(zeros.sum().item() / 2 / image.numel())
        # mid-ranks average to exactly one half, and order is kept (ties aside)
        assert equalised.mean().item() == pytest.approx(0.5, abs=1e-6)
        flat_in, flat_out = image.flatten(), equalised.flatten()
        order = torch.argsort(flat_in)
        assert torch.all(torch.diff(flat_out[order]) >= 0)
    with pytest.raises(ValueError, match="B, C, H, W"):
        equalize_batch(images[0])


def test_model_inputs_equalise_only_where_data_info_says_so() -> None:
    images = levels_batch(3, high=256)
    info = {"normalize": "minus_one_one", "mean01": 0.5, "std01": 0.25, "input_size": 16}
    plain = model_inputs(images, info)
    equalised = model_inputs(images, {**info, "equalize": True})
    resized = resize_batch(images.float() / 255, 16)
    assert torch.equal(plain, normalize_01(resized, "minus_one_one", 0.5, 0.25))
    assert torch.equal(equalised, normalize_01(equalize_batch(resized), "minus_one_one", 0.5, 0.25))
    assert not torch.equal(plain, equalised)


def test_the_datamodule_stores_the_choice_for_evaluation_and_applies_it(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path, {"train": [8], "val": [8]})
    off = ModalityDataModule(str(tmp_path), prepare_dataset=None, batch_size=8, image_size=16)
    on = ModalityDataModule(str(tmp_path), prepare_dataset=None, batch_size=8, image_size=16, equalize=True)
    assert "equalize" not in off.data_info()  # a model trained without it stores what it always stored
    assert on.data_info()["equalize"] is True
    on.setup("fit")
    images, labels = next(iter(on.val_dataloader()))
    inputs, _ = on.on_after_batch_transfer((images, labels), 0)
    expected = model_inputs(images, {**off.data_info(), "equalize": True})
    assert torch.equal(inputs, expected)
