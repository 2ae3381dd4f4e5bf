"""The training augmentation as a typed, checked object (issue 17, item 3): ``data.augment`` builds a
``BatchAugment`` by ``_target_``; plain mappings still work, unknown keys are an error, and batches are the same
as the mapping path gave for the same generator."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from modality.data import ModalityDataModule
from modality.data.batch_transforms import BatchAugment, augment_batch, export_images, prepare_batch
from modality.paths import CONFIG_DIR


def compose_train(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def knobs(block) -> dict:
    """A config's augment block as the plain mapping earlier code read, without ``_target_``."""
    plain = OmegaConf.to_container(block, resolve=True)
    plain.pop("_target_", None)
    return plain


def batch() -> torch.Tensor:
    x = torch.rand(12, 1, 40, 40, generator=torch.Generator().manual_seed(11))
    x[:, :, :6] = 0  # a band of background, as the export window placement expects
    return x


def test_real_shared_block_builds_the_object_and_gives_the_mapping_paths_batches() -> None:
    block = compose_train("experiment=real_shared").data.augment
    augment = instantiate(block)
    assert isinstance(augment, BatchAugment)
    raw = yaml.safe_load((CONFIG_DIR / "experiment" / "real_shared.yaml").read_text())["data"]["augment"]
    for key, value in raw.items():
        if key != "_target_":
            assert getattr(augment, key) == value, key
    x = batch()
    from_object = augment_batch(x, augment, torch.Generator().manual_seed(3))
    from_mapping = augment_batch(x, knobs(block), torch.Generator().manual_seed(3))
    assert torch.equal(from_object, from_mapping)
    assert not torch.equal(from_object, x)
    # the blur_sigma and export-option branches too
    other = {**knobs(block), "blur": 1.0, "blur_sigma": 1.5, "export": 1.0, "export_quality": [40, 60]}
    assert torch.equal(
        augment_batch(x, BatchAugment(**other), torch.Generator().manual_seed(4)),
        augment_batch(x, other, torch.Generator().manual_seed(4)),
    )


def test_config_defaults_are_the_dataclass_defaults_and_export_images_defaults() -> None:
    block = knobs(compose_train().data.augment)
    assert BatchAugment.from_config(block) == BatchAugment()
    assert block == BatchAugment().to_dict()  # every knob spelled out, so each one can be overridden
    assert not BatchAugment().enabled
    signature = inspect.signature(export_images).parameters
    defaults = {name: signature[name].default for name in BatchAugment().export_options()}
    assert BatchAugment().export_options() == defaults | {"quality": tuple(defaults["quality"])}


@pytest.mark.parametrize(
    ("overrides", "enabled", "export"),
    [
        (["data.augment.export=0.3"], True, 0.3),
        (["experiment=real_shared", "data.augment.export=0.3"], True, 0.3),
        (["experiment=real_shared_noaug"], False, 0.0),
    ],
)
def test_command_line_overrides_of_single_knobs(overrides: list[str], enabled: bool, export: float) -> None:
    augment = instantiate(compose_train(*overrides).data.augment)
    assert augment.enabled is enabled and augment.export == export


def test_null_is_no_augmentation(tmp_path: Path) -> None:
    cfg = compose_train("experiment=real_shared", "data.augment=null")
    assert cfg.data.augment is None
    datamodule = ModalityDataModule(data_dir=str(tmp_path), augment=cfg.data.augment, prepare_dataset=None)
    assert datamodule.augment == BatchAugment() and not datamodule.augment.enabled
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    common = {"normalize": "minus_one_one", "mean01": 0.5, "std01": 0.2, "image_size": 8}
    assert torch.equal(
        prepare_batch(images, augment=datamodule.augment, **common),
        prepare_batch(images, augment=None, **common),
    )


def test_datamodule_takes_the_object_or_a_mapping(tmp_path: Path) -> None:
    augment = BatchAugment(hflip=0.5, rotate_deg=15, export_quality=[40, 90])
    assert augment.rotate_deg == 15.0 and augment.export_quality == (40, 90)
    for given in (augment, augment.to_dict(), {"hflip": 0.5, "rotate_deg": 15, "export_quality": (40, 90)}):
        datamodule = ModalityDataModule(data_dir=str(tmp_path), augment=given, prepare_dataset=None)
        assert datamodule.augment == augment
    assert BatchAugment.from_config(augment.to_dict()) == augment
    assert (
        BatchAugment.from_config({"_target_": "modality.data.batch_transforms.BatchAugment"})
        == BatchAugment()
    )


def test_unknown_keys_are_an_error_not_ignored(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown augment key.*hflp"):
        BatchAugment.from_config({"hflp": 0.5})
    with pytest.raises(ValueError, match="hflp"):
        augment_batch(batch(), {"hflp": 0.5})
    with pytest.raises(ValueError, match="hflp"):
        ModalityDataModule(data_dir=str(tmp_path), augment={"hflp": 0.5}, prepare_dataset=None)
    with pytest.raises(ValueError, match="_target_"):
        BatchAugment.from_config({"_target_": "builtins.dict", "hflip": 0.5})
    # a key added on the command line (the '+' Hydra asks for) reaches the constructor, which refuses it
    with pytest.raises(InstantiationException, match="hflp"):
        instantiate(compose_train("+data.augment.hflp=0.5").data.augment)


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"hflip": 1.5}, "hflip"),
        ({"export": -0.1}, "export"),
        ({"noise": -0.01}, "noise"),
        ({"rotate_deg": float("inf")}, "rotate_deg"),
        ({"scale": 1.0}, "scale"),
        ({"vflip": True}, "vflip"),
        ({"gamma": "0.4"}, "gamma"),
        ({"export_quality": [0, 95]}, "quality"),
        ({"export_quality": [30.5, 95]}, "export_quality"),
        ({"export_window_width": 0.0}, "window_width"),
    ],
)
def test_bad_values_are_refused_once_naming_the_key(params: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        BatchAugment(**params)
