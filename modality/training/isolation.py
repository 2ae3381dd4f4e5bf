"""Run one Hydra multirun job that needs several processes (DDP) as a fresh single-run subprocess.

Why: Lightning starts DDP ranks > 0 by re-executing ``sys.argv``. Inside a multirun that argv is the whole
sweep, so rank 1 replays every job of the sweep in lock-step with rank 0 and writes a second sweep folder
(measured here; Lightning issues #2727, #11300, multirun support removed in 1.8.3, #15737). Running each
such job as ``python train.py <the job's own overrides> hydra.mode=RUN hydra.run.dir=<job dir>`` hands
Lightning a plain single run, whose relaunch it handles. The parent sweep only waits and reads the job's
``run_summary.json``; a crashed child is recorded as failed and the sweep goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Set in the child so it never isolates again (and tests can tell where a job ran).
ISOLATED_ENV = "MODALITY_ISOLATED_JOB"
CHILD_LOG_NAME = "train_subprocess.log"


def expected_world_size(trainer_cfg: Mapping[str, Any], cuda_devices: int | None = None) -> int:
    """How many processes the trainer config will run (devices x nodes), without building a Trainer."""
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count()
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    devices = trainer_cfg.get("devices", "auto")
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    uses_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda_devices > 0)
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        per_node = len(devices)
    elif str(devices) in ("auto", "-1"):
        per_node = max(1, cuda_devices) if uses_gpu else 1
    elif isinstance(devices, str) and "," in devices:
        per_node = len([part for part in devices.split(",") if part.strip()])
    else:
        per_node = int(devices)
    return per_node * nodes


def launched_by_cluster() -> bool:
    """SLURM (e.g. the submitit launcher) starts one task per rank itself: Lightning relaunches nothing."""
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1


def needs_isolation(is_multirun: bool, trainer_cfg: Mapping[str, Any], policy: str = "auto") -> bool:
    """``policy``: ``auto`` (isolate multirun jobs that start several processes), ``always``, ``never``."""
    if os.environ.get(ISOLATED_ENV) == "1" or not is_multirun or policy == "never":
        return False
    if policy == "always":
        return True
    if policy != "auto":
        raise ValueError(f"unknown job_isolation '{policy}', expected auto, always or never")
    return expected_world_size(trainer_cfg) > 1 and not launched_by_cluster()


def quote_override_value(value: str) -> str:
    """Double-quote a value for Hydra's override grammar (paths may hold '=', ',', spaces or brackets)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def child_command(
    entry_point: Sequence[str], config_name: str, overrides: Sequence[str], job_dir: str
) -> list[str]:
    """``python train.py --config-name X <job overrides> hydra.mode=RUN hydra.run.dir=<job dir>``."""
    return [
        *entry_point,
        f"--config-name={config_name}",
        *overrides,
        "hydra.mode=RUN",
        f"hydra.run.dir={quote_override_value(job_dir)}",
    ]


def entry_point_command() -> list[str]:
    """How this process was started (script path or ``-m module``), as Lightning's own relaunch does."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name:
        return [sys.executable, "-m", spec.name]
    return [sys.executable, str(Path(sys.argv[0]).resolve())]


def run_isolated(
    command: Sequence[str], job_dir: str | Path, timeout_s: float | None = None
) -> tuple[int, str]:
    """Run the child with its output in ``<job_dir>/train_subprocess.log``; returns (exit code, log tail)."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    log_path = job_dir / CHILD_LOG_NAME
    env = dict(os.environ, **{ISOLATED_ENV: "1"})
    with log_path.open("w", encoding="utf-8") as log:
        # A session of its own, so a timeout ends the child's DDP ranks too (they would otherwise block in
        # a collective until the process-group timeout).
        child = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            code = -9
            log.write(f"\n[modality] job killed after {timeout_s} s\n")
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
    return code, tail
