"""Run ``python train.py`` in a subprocess on tiny shards, as a user would (Lightning's DDP relaunch and
Hydra's multirun need a real command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from modality.paths import PROJECT_ROOT

TESTS_DIR = Path(__file__).resolve().parent

#: Small, fast settings for tiny 32 px shards (grey level tells the class apart).
TINY_OVERRIDES = [
    "trainer=cpu",
    "model=resnet18",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.image_size=null",
    "data.shuffle_buffer=32",
    "optimizer.lr=0.01",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def run_train(data_dir: Path, overrides: list[str], timeout_s: float = 400) -> subprocess.CompletedProcess:
    flags = [item for item in overrides if item.startswith("-")]  # argparse wants -m before the overrides
    overrides = [item for item in overrides if not item.startswith("-")]
    command = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        *flags,
        "data=prepared",
        f"data.data_dir={data_dir}",
        *TINY_OVERRIDES,
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    env.pop("MODALITY_ISOLATED_JOB", None)
    return subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def run_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "run_summary.json").read_text())


def explain(result: subprocess.CompletedProcess) -> str:
    return (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"
    )
