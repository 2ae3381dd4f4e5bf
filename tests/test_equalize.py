"""Histogram equalisation of the network's input (``data.equalize``): invariant to increasing intensity curves,
flat regions stay flat, and every path that feeds the model reads it from the checkpoint's ``data_info``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_shards import write_tiny_shards

from modality.data import ModalityDataModule
from modality.data.batch_transforms import (
    drop_channels,
    equalize_batch,
    input_channels,
    model_inputs,
    normalize_01,
    prepare_batch,
    resize_batch,
)
from modality.models import ModalityClassifier, create_network


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


def test_both_gives_two_channels_the_picture_and_its_equalised_copy() -> None:
    images = levels_batch(4, high=256)
    info = {"normalize": "minus_one_one", "mean01": 0.5, "std01": 0.25, "input_size": 16}
    both = model_inputs(images, {**info, "equalize": "both"})
    assert both.shape == (4, 2, 16, 16)
    assert torch.equal(both[:, :1], model_inputs(images, info))
    assert torch.equal(both[:, 1:], model_inputs(images, {**info, "equalize": True}))
    assert input_channels({**info, "equalize": "both"}) == 2
    assert input_channels({**info, "equalize": True}) == input_channels(info) == 1
    with pytest.raises(ValueError, match="false, true, both"):
        model_inputs(images, {**info, "equalize": "yes"})


def test_channel_dropout_greys_out_exactly_one_channel_of_the_chosen_images() -> None:
    x01 = torch.rand(400, 2, 8, 8) * 0.4  # never 0.5 by chance: the grey is recognisable
    torch.manual_seed(0)
    out = drop_channels(x01, 0.5)
    greyed = (out == 0.5).flatten(2).all(dim=2)  # (B, 2): which channel became flat grey
    kept = (out == x01).flatten(2).all(dim=2)
    assert torch.all(greyed ^ kept)  # each channel either untouched or wholly grey
    assert torch.all(greyed.sum(dim=1) <= 1)  # never both
    hit = greyed.any(dim=1).float().mean().item()
    assert 0.4 < hit < 0.6
    assert 0.35 < greyed[:, 0].float().mean().item() / hit < 0.65  # either channel alike
    assert torch.equal(drop_channels(x01, 0.0), x01)
    with pytest.raises(ValueError, match="two input channels"):
        drop_channels(x01[:, :1], 0.3)
    with pytest.raises(ValueError, match="two input channels"):
        prepare_batch(
            (x01[:, :1] * 255).to(torch.uint8),
            normalize="minus_one_one",
            mean01=0.5,
            std01=0.25,
            image_size=None,
            augment={"channel_dropout": 0.3},
        )


def test_a_two_channel_model_trains_on_both_and_keeps_pretrained_weights_meaningful(tmp_path: Path) -> None:
    dm = ModalityDataModule(str(tmp_path), prepare_dataset=None, batch_size=8, image_size=16, equalize="both")
    write_tiny_shards(tmp_path, {"train": [8], "val": [8]})
    info = dm.data_info()
    assert info["equalize"] == "both" and info["input_channels"] == 2  # what the classifier builds for
    assert (
        "input_channels"
        not in ModalityDataModule(str(tmp_path), prepare_dataset=None, equalize=True).data_info()
    )
    one = create_network("resnet18", len(info["classes"]))
    rgb = {k: v.repeat(1, 3, 1, 1) / 3 if k == "conv1.weight" else v for k, v in one.state_dict().items()}
    torch.save(rgb, tmp_path / "rgb.pth")  # RGB weights whose grey response is the one-channel network's
    model = ModalityClassifier(network="resnet18", data_info=info, pretrained_path=str(tmp_path / "rgb.pth"))
    assert model.network.conv1.weight.shape[1] == 2
    # the same grey picture in both channels answers as the one-channel network does on it
    one.eval()
    model.network.eval()
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.network(grey.repeat(1, 2, 1, 1)), one(grey), atol=1e-4)
        assert not torch.allclose(model.network(torch.cat([grey, 1 - grey], 1)), one(grey), atol=1e-4)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    inputs, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert inputs.shape[1] == 2
    assert model.network(inputs).shape == (inputs.shape[0], len(info["classes"]))
