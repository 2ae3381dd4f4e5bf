"""A tiny demo-trained two-job multirun, built once per test session, for the evaluation/report tests.

Prepare builds a small demo pool (5% of the sites' files, 32 px); ``train.py -m`` trains resnet18 for two
short epochs with weight_decay 0 and 0.01 (the study's L2 axis). Both go through the real entry points in
subprocesses, so the tests exercise what users run. The result is cached under pytest's session base
temp folder; any test module can call :func:`demo_multirun` and the work happens once.
``MODALITY_TEST_CACHE=<dir>`` keeps it between sessions instead (handy while iterating on eval code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from modality.paths import CONFIG_DIR, PROJECT_ROOT

DEMO_SCALE = 0.05
IMAGE_SIZE = 32


def _run(command: list[str], log: Path) -> None:
    """Run an entry point; on failure raise with the log tail (pytest shows it)."""
    with log.open("w") as handle:
        completed = subprocess.run(
            command, cwd=PROJECT_ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=900
        )
    if completed.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{tail}")


def _cache_base(base: Path) -> Path:
    return Path(os.environ.get("MODALITY_TEST_CACHE") or base)


def demo_pool(base: Path) -> Path:
    """Prepared shards of a small demo pool (built once)."""
    base = _cache_base(base)
    out_dir = base / "eval_demo" / "prepared"
    if (out_dir / "summary.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable,
            "-m",
            "modality.prepare",
            "dataset=demo",
            f"out_dir={out_dir}",
            f"paths.data_dir={base / 'eval_demo' / 'data'}",
            f"image_size={IMAGE_SIZE}",
            f"dataset.sources.0.scale={DEMO_SCALE}",
            "progress=false",
            "charts=false",
            f"hydra.run.dir={base / 'eval_demo' / 'prepare_log'}",
        ],
        base / "eval_demo" / "prepare.log",
    )
    return out_dir


def demo_multirun(base: Path) -> Path:
    """The sweep folder of a two-job multirun (jobs ``0`` and ``1``) trained on :func:`demo_pool`."""
    base = _cache_base(base)
    sweep = base / "eval_demo" / "multirun"
    if all((sweep / job / "run_summary.json").is_file() for job in ("0", "1")):
        return sweep
    data_dir = demo_pool(base)
    _run(
        [
            sys.executable,
            "train.py",
            "-m",
            "data=prepared",
            f"data.data_dir={data_dir}",
            f"data.image_size={IMAGE_SIZE}",
            "data.batch_size=32",
            "data.eval_batch_size=64",
            "data.shuffle_buffer=200",
            "trainer=cpu",
            "trainer.max_epochs=2",
            "+trainer.limit_train_batches=3",
            "trainer.num_sanity_val_steps=0",
            "trainer.precision=32",
            "callbacks.throughput=null",
            "logger=csv",
            "optimizer.weight_decay=0,0.01",
            f"hydra.sweep.dir={sweep}",
        ],
        base / "eval_demo" / "train.log",
    )
    return sweep


#: Timing at batch 1 and 8 only, few repeats: the tests check the plumbing, not the speed.
EVAL_OVERRIDES = ["trainer=cpu", "timing.batch_sizes=[1,8]", "timing.repeats=3", "timing.warmup=1"]


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    """eval.py's default for a run folder (metrics into ``<run>/eval``), computed once per cached run."""
    from hydra import compose, initialize_config_dir

    from modality.evaluation.shard_split import evaluate_from_config

    cached = run_dir / "eval" / "metrics.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"ckpt_path={run_dir}", *EVAL_OVERRIDES])
    metrics = evaluate_from_config(cfg)
    if metrics is None:
        raise RuntimeError("evaluate_from_config returned nothing on rank 0")
    return metrics
