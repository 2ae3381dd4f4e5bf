"""``python train.py`` end to end on tiny shards: learning, checkpoints, TensorBoard tags, exact resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from tiny_shards import write_tiny_shards
from train_helpers import explain, run_summary, run_train

from modality.data.batch_transforms import BatchAugment
from modality.training.isolation import expected_world_size


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_shards(
        tmp_path_factory.mktemp("shards"), {"train": [48, 24], "val": [20], "test": [16]}
    )


@pytest.fixture(scope="module")
def two_epoch_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run_a")
    result = run_train(tiny_dir, ["trainer.max_epochs=2", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, explain(result)
    assert f"tensorboard --logdir {run_dir}/tensorboard" in result.stdout
    return run_dir


def test_training_learns_the_tiny_classes_and_summarises_the_run(two_epoch_run: Path) -> None:
    summary = run_summary(two_epoch_run)
    assert summary["status"] == "ok" and summary["error"] is None
    # Chance is 0.25; 18 steps of resnet18 reach 0.75-1.0 here (BatchNorm running statistics lag the
    # weights this early), so 0.6 separates "learns" from "wiring broken" without flaking.
    assert summary["val"]["balanced_acc"] >= 0.6
    assert summary["val"]["samples"] == 20
    assert summary["test"]["samples"] == 16
    assert summary["model"] == "resnet18" and summary["epochs"] == 2 and summary["images_per_s"] > 0
    assert Path(summary["best_ckpt"]).name == "best.ckpt"
    assert summary["augment"] == BatchAugment().to_dict()  # the checked knobs, all off in data=prepared


def test_checkpoints_every_epoch_plus_last_and_best(two_epoch_run: Path) -> None:
    names = {path.name for path in (two_epoch_run / "checkpoints").iterdir()}
    assert {"epoch_000.ckpt", "epoch_001.ckpt", "last.ckpt", "best.ckpt"} <= names
    assert (two_epoch_run / ".hydra" / "config.yaml").is_file()


def test_csv_and_tensorboard_hold_the_metric_paths(two_epoch_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = {
        "train/loss",
        "train/acc",
        "train/balanced_acc",
        "train/recall_CT",
        "train/images_per_s",
        "val/loss",
        "val/acc",
        "val/balanced_acc",
        "val/acc_best",
        "val/recall_XR",
        "lr-SGD",
    }
    with (two_epoch_run / "csv" / "metrics.csv").open() as handle:
        assert expected <= set(next(csv.reader(handle)))
    events = EventAccumulator(str(two_epoch_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert expected <= set(events.Tags()["scalars"])
    assert "val/confusion_matrix" in events.Tags()["images"]
    assert len(events.Scalars("val/balanced_acc")) >= 2


def test_resume_from_last_continues_exactly(tiny_dir: Path, two_epoch_run: Path, tmp_path: Path) -> None:
    first = run_train(tiny_dir, ["trainer.max_epochs=1", "test=false", f"hydra.run.dir={tmp_path}"])
    assert first.returncode == 0, explain(first)
    resumed = run_train(
        tiny_dir, ["trainer.max_epochs=2", "ckpt_path=last", "test=false", f"hydra.run.dir={tmp_path}"]
    )
    assert resumed.returncode == 0, explain(resumed)
    straight = torch.load(two_epoch_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    split = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert split["epoch"] == straight["epoch"] == 1 and split["global_step"] == straight["global_step"]
    for key, value in straight["state_dict"].items():
        assert torch.allclose(value.float(), split["state_dict"][key].float(), atol=1e-6), key
    momentum = [state["momentum_buffer"] for state in straight["optimizer_states"][0]["state"].values()]
    resumed_momentum = [state["momentum_buffer"] for state in split["optimizer_states"][0]["state"].values()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(momentum, resumed_momentum, strict=True))
    assert straight["plateau_scheduler"] == split["plateau_scheduler"]


def test_world_size_is_read_from_the_trainer_config() -> None:
    assert expected_world_size({"accelerator": "cpu", "devices": 2}, cuda_devices=0) == 2
    assert expected_world_size({"accelerator": "auto", "devices": "auto"}, cuda_devices=0) == 1
    assert expected_world_size({"accelerator": "gpu", "devices": "auto", "num_nodes": 2}, cuda_devices=4) == 8
    assert expected_world_size({"accelerator": "gpu", "devices": [0, 1]}, cuda_devices=4) == 2


def test_refit_trains_the_recipe_again_on_every_split_and_prints_the_final_model(
    tiny_dir: Path, tmp_path: Path
) -> None:
    result = run_train(
        tiny_dir,
        ["trainer.max_epochs=1", f"hydra.run.dir={tmp_path}", "refit.train_splits=[train,val,test]"],
    )
    assert result.returncode == 0, explain(result)
    measured, refitted = run_summary(tmp_path), run_summary(tmp_path / "refit")
    assert measured["status"] == refitted["status"] == "ok"
    assert measured["test"]["samples"] == 16 and refitted["test"] is None  # the refit's test data is seen
    final = tmp_path / "refit/checkpoints/last.ckpt"
    assert f"final model (trained on train+val+test, last epoch): {final}" in result.stdout
    assert (tmp_path / "refit/tensorboard").is_dir() and (tmp_path / "checkpoints/best.ckpt").is_file()
    assert not (tmp_path / "refit/checkpoints/best.ckpt").exists()  # selected on seen data: not written
    # The refit's epoch covers 108 samples (72 + 20 + 16): 14 batches of 8, against 9 for the 72 of train.
    steps = [
        torch.load(path, map_location="cpu", weights_only=True)["global_step"]
        for path in (tmp_path / "checkpoints/last.ckpt", final)
    ]
    assert steps == [9, 14]


def test_refit_fits_no_calibration_on_its_own_training_data() -> None:
    from omegaconf import OmegaConf

    from modality.training.job import refit_config

    cfg = OmegaConf.create(
        {
            "data": {"train_splits": ["train"]},
            "paths": {"output_dir": "/tmp/run"},
            "refit": {"train_splits": ["train", "val"], "subdir": "refit", "calibration_splits": ["val"]},
            "calibration_splits": ["val"],
            "callbacks": None,
        }
    )
    refit = refit_config(cfg)
    assert refit.calibration_splits is None and refit.refit is None
    assert cfg.calibration_splits == ["val"]


AVERAGING = "callbacks.weight_averaging={_target_:modality.training.callbacks.WeightAveraging,start_epoch:2}"


def test_weight_averaging_checkpoints_the_average_and_resumes_exactly(tiny_dir: Path, tmp_path: Path) -> None:
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    common = ["test=false", "validate_best=false", AVERAGING]
    straight = run_train(tiny_dir, ["trainer.max_epochs=4", f"hydra.run.dir={straight_dir}", *common])
    assert straight.returncode == 0, explain(straight)
    ckpt = torch.load(straight_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "WeightAveraging" in k]
    assert state["count"] == 2 * 9  # epochs 2 and 3 (0-based) of 4, 9 steps each
    weights = ckpt["state_dict"]
    for name, average in state["average"].items():
        assert torch.equal(weights[name].float(), average), name  # the checkpoint holds the average ...
    moved = [name for name in state["average"] if not torch.equal(state["raw"][name].float(), weights[name])]
    assert len(moved) > 10  # ... and the raw weights training continues from are kept beside it
    epoch_2 = torch.load(straight_dir / "checkpoints/epoch_001.ckpt", map_location="cpu", weights_only=True)
    assert not next(v for k, v in epoch_2["callbacks"].items() if "WeightAveraging" in k)["average"]

    first = run_train(tiny_dir, ["trainer.max_epochs=3", f"hydra.run.dir={split_dir}", *common])
    assert first.returncode == 0, explain(first)
    resumed = run_train(
        tiny_dir, ["trainer.max_epochs=4", "ckpt_path=last", f"hydra.run.dir={split_dir}", *common]
    )
    assert resumed.returncode == 0, explain(resumed)
    split = torch.load(split_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    for key, value in ckpt["state_dict"].items():
        assert torch.allclose(value.float(), split["state_dict"][key].float(), atol=1e-6), key
