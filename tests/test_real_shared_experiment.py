"""The real-data experiment configs (issue 6): composition of `experiment=real_shared` and its ablations, and a
short smoke run on the shared corpus (slow: it prepares the real pool)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from modality.paths import CONFIG_DIR, PROJECT_ROOT, shared_data_root

ABLATIONS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("real_shared_*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_real_shared_trains_on_the_shared_pool_with_a_stable_checkpoint_path() -> None:
    cfg = compose_train("experiment=real_shared")
    assert cfg.data.prepare_dataset == "real_shared"
    assert cfg.task_name == "real_shared"
    assert cfg.hydra.run.dir.endswith("outputs/real_shared")
    # the best checkpoint lands at <run dir>/checkpoints/best.ckpt, whatever the run's date
    assert OmegaConf.to_container(cfg.callbacks.best_checkpoint)["filename"] == "best"
    assert cfg.callbacks.best_checkpoint.monitor == "val/balanced_acc"
    overrides = list(cfg.data.prepare_overrides)
    assert any(o.startswith("scaling=") for o in overrides)
    # the prepared folder names its variant, so shards built with another scaling are never reused silently
    assert str(cfg.data.data_dir).endswith(f"prepared_{cfg.real_shared.variant}")
    # the measured run trains on train only; the final model is refitted on every split into <run>/refit
    assert list(cfg.data.train_splits) == ["train"]
    assert list(cfg.refit.train_splits) == ["train", "val", "test"] and cfg.refit.subdir == "refit"


def test_real_shared_dataset_keeps_training_sources_out_of_val_and_test() -> None:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("prepare", overrides=["dataset=real_shared"])
    split = dict(cfg.dataset.split)
    assert {"train", "val", "test"} <= set(split.values())
    assert split["OHIF+viewer-testdata-dicomweb"] == "train"  # the only substantial PET source


@pytest.mark.parametrize("name", ABLATIONS)
def test_each_ablation_changes_its_own_knob_and_its_own_run_and_data_dirs(name: str) -> None:
    base = compose_train("experiment=real_shared")
    cfg = compose_train(f"experiment={name}")
    assert cfg.task_name == name
    assert cfg.hydra.run.dir.endswith(f"outputs/{name}")
    changed = (
        cfg.real_shared.variant != base.real_shared.variant
        or cfg.model.network != base.model.network
        or OmegaConf.to_container(cfg.data.augment) != OmegaConf.to_container(base.data.augment)
        or cfg.data.image_size != base.data.image_size
    )
    assert changed, f"{name} composes to the same run as real_shared"
    if cfg.real_shared.variant != base.real_shared.variant:
        assert cfg.data.data_dir != base.data.data_dir
    # everything not under study stays as in the main experiment, so rows of the table are comparable
    assert cfg.trainer.max_epochs <= base.trainer.max_epochs
    if name != "real_shared_128":
        assert cfg.data.image_size == base.data.image_size
    assert cfg.optimizer.lr == base.optimizer.lr


@pytest.mark.slow
def test_real_shared_smoke_run(tmp_path: Path) -> None:
    """Two short epochs end to end: prepare the shared corpus, train, write run_summary.json and best.ckpt,
    then the refit on every split."""
    if not (shared_data_root() / "manifest.csv").exists():
        pytest.skip(f"shared corpus not found at {shared_data_root()}")
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "experiment=real_shared",
        f"data.data_dir={tmp_path / 'prepared'}",
        "data.image_size=32",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "ok"
    assert (run_dir / "checkpoints" / "best.ckpt").exists()
    assert (run_dir / "refit" / "checkpoints" / "last.ckpt").exists()  # the final model, on every split
    # the fusion: fitted on val for the measured run, on val + test (the measured model's unseen sources) for
    # the refit, which eval.py finds beside each checkpoint
    measured = json.loads((run_dir / "calibration.json").read_text())
    final = json.loads((run_dir / "refit" / "calibration.json").read_text())
    assert measured["fitted_on"]["splits"] == ["val"] and final["fitted_on"]["splits"] == ["val", "test"]
    assert summary["calibration"] == measured
    assert f"final model (trained on train+val+test, last epoch): {run_dir}/refit" in proc.stdout
    assert 0.0 <= summary["val"]["balanced_acc"] <= 1.0
    prepared = json.loads((tmp_path / "prepared" / "summary.json").read_text())
    assert set(prepared["splits"]["train"]["by_class"]) == {"CT", "MR", "PT", "XR"}
