"""The README's resume command on a run killed mid-training: ``python train.py ckpt_path=last hydra.run.dir=<run>``.

The run uses a non-default network (mnasnet) and is killed (SIGKILL) during its second epoch. Resuming it
with nothing but the README's command must reload the run's own config, leave the run's ``.hydra/`` record
as it was, and keep the metrics rows from before the kill (dropping the half epoch the checkpoint does not
hold, which the resumed attempt logs again).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny_shards import write_tiny_shards
from train_helpers import TESTS_DIR, explain, run_summary

from modality.paths import PROJECT_ROOT
from modality.training import hardware
from modality.training.resume import RESUMED_SUBDIR, keep_rows_up_to, resume_argv

STEPS_PER_EPOCH = 9  # 72 training samples, batch 8
EPOCHS = 3


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "train.py"), *overrides]


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    env.pop("MODALITY_ISOLATED_JOB", None)
    return env


def run(command: list[str], timeout_s: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=PROJECT_ROOT, env=environment(), capture_output=True, text=True, timeout=timeout_s
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A mnasnet run (3 epochs planned) killed with SIGKILL once it has logged steps of its second epoch."""
    root = tmp_path_factory.mktemp("resume")
    data_dir = write_tiny_shards(root / "shards", {"train": [48, 24], "val": [20], "test": [16]})
    run_dir = root / "run"
    command = train_command(
        "data=prepared",
        f"data.data_dir={data_dir}",
        "model=mnasnet",
        "trainer=cpu",
        f"trainer.max_epochs={EPOCHS}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "data.image_size=null",
        "data.shuffle_buffer=32",
        "optimizer.lr=0.01",
        f"hydra.run.dir={run_dir}",
    )
    log = (root / "first.log").open("w")
    child = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=environment(), stdout=log, stderr=subprocess.STDOUT
    )
    metrics = run_dir / "csv" / "metrics.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        if metrics.is_file() and any(row.get("epoch") == "1" for row in read_rows(metrics)):
            break
        time.sleep(0.05)
    assert child.poll() is None, (
        f"the run ended before it could be killed:\n{(root / 'first.log').read_text()}"
    )
    child.send_signal(signal.SIGKILL)
    child.wait()
    log.close()
    return {
        "run_dir": run_dir,
        "before_kill": read_rows(metrics),
        "hydra_record": snapshot(run_dir / ".hydra"),
        "checkpoint_epoch": torch.load(
            run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True
        )["epoch"],
    }


def test_a_conflicting_group_override_is_refused_before_anything_is_written(killed_run: dict) -> None:
    run_dir = killed_run["run_dir"]
    before = snapshot(run_dir)
    refused = run(
        train_command("ckpt_path=last", f"hydra.run.dir={run_dir}", "model=resnet18"), timeout_s=120
    )
    assert refused.returncode == 2, explain(refused)
    assert "model=resnet18 (the run used model=mnasnet)" in refused.stderr
    assert snapshot(run_dir) == before


def test_last_without_a_run_holding_last_ckpt_is_refused(tmp_path: Path) -> None:
    refused = run(train_command("ckpt_path=last", f"hydra.run.dir={tmp_path}"), timeout_s=120)
    assert refused.returncode == 2 and "holding checkpoints/last.ckpt" in refused.stderr, explain(refused)
    assert not any(tmp_path.iterdir())


def test_readme_resume_reloads_the_runs_config_keeps_its_record_and_its_metrics(killed_run: dict) -> None:
    run_dir = killed_run["run_dir"]
    assert killed_run["checkpoint_epoch"] < EPOCHS - 1  # killed before the end
    resumed = run(train_command("ckpt_path=last", f"hydra.run.dir={run_dir}"))
    assert resumed.returncode == 0, explain(resumed)
    assert f"resuming {run_dir} with its saved config" in resumed.stdout

    # The run's own config: mnasnet, 3 epochs, trained to the end.
    last = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert last["hyper_parameters"]["network"] == "mnasnet"
    assert last["epoch"] == EPOCHS - 1 and last["global_step"] == EPOCHS * STEPS_PER_EPOCH
    summary = run_summary(run_dir)
    assert summary["status"] == "ok" and summary["model"] == "mnasnet" and summary["epochs"] == EPOCHS
    expected_precision = hardware.choose_cpu_precision(hardware.describe_cpu())[0]
    assert summary["compute"]["precision"] == summary["precision"] == expected_precision

    # The run's record is untouched; the attempt's own record sits beside it.
    for name, content in killed_run["hydra_record"].items():
        assert (run_dir / ".hydra" / name).read_bytes() == content, name
    (attempt,) = (run_dir / RESUMED_SUBDIR).iterdir()
    effective = OmegaConf.load(attempt / "config.yaml")
    assert effective.model.network == "mnasnet" and effective.ckpt_path == "last"
    assert OmegaConf.to_container(OmegaConf.load(attempt / "overrides.yaml")) == ["ckpt_path=last"]

    # Metrics: the rows the checkpoint covers are kept as they were; the cut epoch is logged once, afresh.
    after = read_rows(run_dir / "csv" / "metrics.csv")
    covered = [
        row
        for row in killed_run["before_kill"]
        if row["epoch"] and int(row["epoch"]) <= killed_run["checkpoint_epoch"]
    ]
    assert covered and all(
        {k: v for k, v in row.items() if v} in [{k: v for k, v in a.items() if v} for a in after]
        for row in covered
    )
    train_steps = Counter(int(row["step"]) for row in after if row.get("train/loss_step"))
    assert train_steps == Counter(range(EPOCHS * STEPS_PER_EPOCH))  # every step once, none lost, none twice
    val_epochs = Counter(int(row["epoch"]) for row in after if row.get("val/acc_best"))
    assert val_epochs == Counter(range(EPOCHS + 1))  # + the best checkpoint re-validated after fit, once


def test_rows_after_the_checkpoint_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,lr-SGD,step,train/loss_step,val/acc\n"
        ",0.1,0,,\n0,,0,1.5,\n0,,8,,0.5\n,0.1,9,,\n1,,9,1.2,\n1,,17,,0.6\n,0.1,18,,\n2,,18,0.9,\n2,,19,0.8,\n"
    )
    kept = keep_rows_up_to(path, epoch=1, global_step=18)  # checkpoint after epoch 1; killed in epoch 2
    assert [(row["epoch"], row["step"]) for row in kept] == [
        ("", "0"),
        ("0", "0"),
        ("0", "8"),
        ("", "9"),
        ("1", "9"),
        ("1", "17"),
    ]


def test_resume_argv_redirects_hydras_record_only_for_a_resume(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("MODALITY_ISOLATED_JOB", raising=False)
    fresh = ["train.py", "model=mnasnet", f"hydra.run.dir={tmp_path}"]
    assert resume_argv(fresh) == fresh
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra/config.yaml").write_text("ckpt_path: null\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/last.ckpt").write_bytes(b"")
    command = ["train.py", "ckpt_path=last", f"hydra.run.dir={tmp_path}"]
    assert resume_argv(command, now=0)[:-1] == command
    assert resume_argv(command, now=0)[-1].startswith(f"hydra.output_subdir={RESUMED_SUBDIR}/")
    # Ranks Lightning relaunches keep its hydra.output_subdir=null; a sweep is never a resume.
    relaunched = [*command, "hydra.output_subdir=null"]
    assert resume_argv(relaunched) == relaunched
    assert resume_argv(["train.py", "-m", *command[1:]]) == ["train.py", "-m", *command[1:]]
