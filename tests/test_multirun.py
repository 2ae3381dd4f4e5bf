"""Hydra multirun through ``python train.py -m``: one directory per job with its own logs and checkpoints,
also when every job runs DDP (each job isolated in its own single-run process), and a crashing job
recorded as failed without stopping the sweep. Plus config composition for the sweeps and SLURM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from tiny_shards import write_tiny_shards
from train_helpers import explain, run_train

from modality.paths import CONFIG_DIR

QUICK = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "test=false",
    "validate_best=false",
]
SWEEP = ["model=resnet18,mnasnet", "optimizer.weight_decay=0,0.01"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), {"train": [24, 16], "val": [8]})


def job_summaries(sweep_dir: Path) -> dict[tuple[str, float], dict]:
    summaries = {}
    for job_dir in sorted(path for path in sweep_dir.iterdir() if path.is_dir()):
        summary = json.loads((job_dir / "run_summary.json").read_text())
        assert summary["output_dir"] == str(job_dir)
        summaries[(summary["model"], summary["weight_decay"])] = summary
    return summaries


def assert_four_runs(sweep_dir: Path) -> None:
    summaries = job_summaries(sweep_dir)
    assert set(summaries) == {(m, wd) for m in ("resnet18", "mnasnet") for wd in (0.0, 0.01)}
    for summary in summaries.values():
        job_dir = Path(summary["output_dir"])
        assert summary["status"] == "ok", summary["error"]
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()
        assert list((job_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert (job_dir / "csv" / "metrics.csv").is_file()
        assert (job_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow  # the DDP sweep below covers the same 2x2 grid; the crash test covers in-process jobs
def test_two_by_two_sweep_gives_four_runs(tiny_dir: Path, tmp_path: Path) -> None:
    result = run_train(tiny_dir, ["-m", *SWEEP, *QUICK, f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode == 0, explain(result)
    assert_four_runs(tmp_path)


@pytest.mark.parametrize(
    "sweep",
    [
        pytest.param(SWEEP, id="2x2", marks=pytest.mark.slow),
        pytest.param(
            ["model=resnet18,mnasnet", "optimizer.weight_decay=0.01"], id="2x1"
        ),  # default run: half
    ],
)
def test_sweep_with_ddp_runs_each_job_in_its_own_process(
    tiny_dir: Path, tmp_path: Path, sweep: list[str]
) -> None:
    result = run_train(
        tiny_dir, ["-m", "trainer=ddp_cpu", *sweep, *QUICK, f"hydra.sweep.dir={tmp_path}"], 900
    )
    assert result.returncode == 0, explain(result)
    jobs = 4 if sweep == SWEEP else 2
    if jobs == 4:
        assert_four_runs(tmp_path)
    else:
        summaries = job_summaries(tmp_path)
        assert {key[0] for key in summaries} == {"resnet18", "mnasnet"}
        for summary in summaries.values():
            assert summary["status"] == "ok", summary["error"]
            assert (Path(summary["output_dir"]) / "checkpoints" / "last.ckpt").is_file()
            assert list((Path(summary["output_dir"]) / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == [
        str(job) for job in range(jobs)
    ]
    for job in range(jobs):
        log = (tmp_path / str(job) / "train_subprocess.log").read_text()
        assert "[modality] checkpoints:" in log  # the child trained and reported its run
        assert "hydra.mode=RUN" in (tmp_path / str(job) / ".hydra" / "hydra.yaml").read_text()
        hydra_overrides = (tmp_path / str(job) / ".hydra" / "overrides.yaml").read_text()
        assert "trainer=ddp_cpu" in hydra_overrides
    # Rank 1 must not replay the sweep: no second sweep folder beside the first.
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}*/0/0"))


def test_a_crashing_job_is_recorded_and_the_sweep_goes_on(tiny_dir: Path, tmp_path: Path) -> None:
    result = run_train(
        tiny_dir, ["-m", "model.network=no_such_network,mnasnet", *QUICK, f"hydra.sweep.dir={tmp_path}"]
    )
    assert result.returncode == 0, explain(result)
    failed = json.loads((tmp_path / "0" / "run_summary.json").read_text())
    assert failed["status"] == "failed" and "no_such_network" in failed["error"]
    assert json.loads((tmp_path / "1" / "run_summary.json").read_text())["status"] == "ok"


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_reference_experiments_compose_to_their_sweeps() -> None:
    architectures = compose_train(["experiment=seed_architectures"])
    assert architectures.hydra.sweeper.params.model.split(",") == [
        "vgg16",
        "resnet18",
        "resnet34",
        "resnet50",
        "densenet121",
        "mnasnet",
    ]
    assert architectures.optimizer.lr == 0.1 and architectures.optimizer.momentum == 0.9
    assert architectures.data.batch_size == 128 and architectures.trainer.max_epochs == 5
    assert architectures.scheduler.factor == 0.1
    l2 = compose_train(["experiment=seed_l2_sweep"])
    assert l2.model.network == "vgg16" and l2.model.extra_dropout == 0.5
    assert l2.hydra.sweeper.params["optimizer.weight_decay"] == "0.0,0.005,0.01,0.015,0.02"


def test_slurm_launcher_and_optuna_search_compose() -> None:
    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 2 and launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4
    optuna = compose_train(["hparams_search=optuna"])
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert optuna.hydra.sweeper.direction == "maximize" and optuna.optimized_metric == "val/balanced_acc"
