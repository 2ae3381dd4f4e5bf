"""ModalityClassifier and the six reference networks: one-channel, dropout variants, local weights,
checkpoints that load without pickle."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch
from tiny_shards import write_tiny_shards
from torch import nn

from modality.data import ModalityDataModule
from modality.models import REFERENCE_NETWORKS, ModalityClassifier, create_network

INFO = {"classes": ["CT", "MR", "PT", "XR"], "preprocess": {"image_size": 32}, "normalize": "minus_one_one"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), {"train": [16], "val": [8], "test": [8]})


@pytest.mark.parametrize("network", list(REFERENCE_NETWORKS))
def test_fast_dev_run_trains_each_reference_network(network: str, tiny_dir: Path, tmp_path: Path) -> None:
    datamodule = ModalityDataModule(str(tiny_dir), batch_size=4, prepare_dataset=None)
    datamodule.setup("fit")
    model = ModalityClassifier(network, data_info=datamodule.data_info(), dropout=0.2)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(
        accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.state.finished
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert changed > 0, "one optimiser step must move the weights"
    assert model.network(torch.zeros(2, 1, 32, 32)).shape == (2, 4)


def test_reference_vgg16_dropout_variant_has_five_extra_layers() -> None:
    plain = create_network("vgg16", 4)
    variant = create_network("vgg16", 4, dropout=0.5, extra_dropout=0.5)
    count = lambda net: sum(isinstance(m, nn.Dropout) and m.p == 0.5 for m in net.modules())  # noqa: E731
    assert count(plain) == 0
    assert count(variant) == 5 + 2  # five after the pooling stages + timm drop_rate (pre_logits, head)
    with pytest.raises(ValueError, match="max-pooling"):
        create_network("mnasnet", 4, extra_dropout=0.5)


def test_pretrained_weights_load_from_a_local_file_only(tmp_path: Path) -> None:
    rgb = timm.create_model("resnet18", pretrained=False, in_chans=3, num_classes=10)
    path = tmp_path / "rgb.pth"
    torch.save(rgb.state_dict(), path)
    network = create_network("resnet18", 4, pretrained_path=str(path))
    expected = rgb.conv1.weight.sum(dim=1, keepdim=True)
    assert torch.allclose(network.conv1.weight, expected)
    assert torch.equal(network.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        create_network("resnet18", 4, pretrained_path=str(tmp_path / "missing.pth"))


def test_pretrained_weights_from_our_own_checkpoint_load_and_another_architecture_is_refused(
    tmp_path: Path,
) -> None:
    """The two reasons ``load_local_weights`` is kept instead of timm's ``pretrained_cfg_overlay=dict(file=..)``,
    which loads neither the ``network.``-prefixed keys nor complains about a file that matches nothing."""
    trained = create_network("resnet18", 4)
    own = tmp_path / "own.ckpt"
    torch.save({"state_dict": {f"network.{k}": v for k, v in trained.state_dict().items()}}, own)
    network = create_network("resnet18", 4, pretrained_path=str(own))
    loaded, saved = network.state_dict(), trained.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    other = tmp_path / "densenet.pth"
    torch.save(timm.create_model("densenet121", pretrained=False, num_classes=10).state_dict(), other)
    with pytest.raises(ValueError, match="wrong architecture"):
        create_network("resnet18", 4, pretrained_path=str(other))


def test_checkpoint_holds_plain_hyperparameters_and_loads_without_pickle(
    tiny_dir: Path, tmp_path: Path
) -> None:
    datamodule = ModalityDataModule(str(tiny_dir), batch_size=4, prepare_dataset=None)
    datamodule.setup("fit")
    pl.seed_everything(0)
    model = ModalityClassifier(
        "resnet18",
        data_info=datamodule.data_info(),
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.001},
        scheduler={"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 1},
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    hparams = raw["hyper_parameters"]
    assert hparams["data_info"]["classes"] == INFO["classes"]
    assert hparams["data_info"]["preprocess"]["image_size"] == 32
    restored = ModalityClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    restored.eval()
    model.eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    images = torch.randn(3, 1, 32, 32)
    assert torch.isfinite(model(images)).all()
    assert torch.allclose(restored(images), model(images))
    assert hparams["optimizer"]["lr"] == 0.001 and "optimizer_states" in raw


def test_label_smoothing_softens_the_training_loss_only() -> None:
    info = {"classes": ["CT", "MR", "PT", "XR"], "input_size": 32}
    torch.manual_seed(0)
    plain = ModalityClassifier("resnet18", data_info=info).eval()
    smoothed = ModalityClassifier("resnet18", data_info=info, label_smoothing=0.2).eval()
    smoothed.load_state_dict(plain.state_dict())
    images, labels = torch.randn(6, 1, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        logits = plain(images)
        assert torch.allclose(
            plain._shared_step((images, labels), "val"), smoothed._shared_step((images, labels), "val")
        )
        expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
        assert torch.allclose(smoothed._shared_step((images, labels), "train"), expected)
        assert not torch.allclose(expected, plain._shared_step((images, labels), "train"))
    with pytest.raises(ValueError, match="label_smoothing"):
        ModalityClassifier("resnet18", data_info=info, label_smoothing=1.0)


def test_balanced_class_weights_reweight_the_training_loss_only() -> None:
    info = {"classes": ["CT", "MR", "PT", "XR"], "input_size": 32, "train_class_counts": [30, 60, 0, 10]}
    torch.manual_seed(0)
    plain = ModalityClassifier("resnet18", data_info=info).eval()
    weighted = ModalityClassifier("resnet18", data_info=info, class_weights="balanced").eval()
    weighted.load_state_dict(plain.state_dict())
    # N / (K * n_c) over the 3 classes present; the absent PT gets 1.
    assert weighted.train_loss_weights.tolist() == pytest.approx([100 / 90, 100 / 180, 1.0, 100 / 30])
    images, labels = torch.randn(6, 1, 32, 32), torch.tensor([0, 1, 3, 3, 0, 1])
    with torch.no_grad():
        logits = plain(images)
        assert torch.allclose(
            plain._shared_step((images, labels), "val"), weighted._shared_step((images, labels), "val")
        )
        expected = torch.nn.functional.cross_entropy(logits, labels, weight=weighted.train_loss_weights)
        assert torch.allclose(weighted._shared_step((images, labels), "train"), expected)
        assert not torch.allclose(expected, plain._shared_step((images, labels), "train"))
    explicit = ModalityClassifier("resnet18", data_info=info, class_weights=[1, 2, 3, 4])
    assert explicit.train_loss_weights.tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="class_weights"):
        ModalityClassifier("resnet18", data_info=info, class_weights="inverse")
    with pytest.raises(ValueError, match="class_weights"):
        ModalityClassifier("resnet18", data_info=info, class_weights=[1, 2])
    with pytest.raises(ValueError, match="train_class_counts"):
        ModalityClassifier("resnet18", data_info={"classes": ["CT", "MR"]}, class_weights="balanced")
