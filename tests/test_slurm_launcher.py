"""The SLURM commands the README and docs/training.md show ask SLURM for what the trainer will use.

Hydra's stock ``hydra/launcher=submitit_slurm`` composes ``nodes: 1, tasks_per_node: 1, gpus_per_node: null``
whatever ``trainer.num_nodes`` says; the repo's ``hydra/launcher=slurm`` interpolates them from the trainer.
The tests read the commands from the documents themselves, so an edit there cannot drift from the configs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from modality.paths import CONFIG_DIR, PROJECT_ROOT


def documented_slurm_commands(document: Path) -> list[str]:
    """Every ``python train.py ... hydra/launcher=...`` command written in ``document``."""
    text = document.read_text(encoding="utf-8")
    return re.findall(r"python train\.py [^`\n|#]*hydra/launcher=[^`\n|#]*", text)


def compose_command(command: str):
    """The config of the command's first job: flags dropped, a sweep ``a,b`` reduced to ``a``."""
    overrides = []
    for token in shlex.split(command)[2:]:
        if token.startswith("-"):
            continue
        key, _, value = token.partition("=")
        overrides.append(f"{key}={value.split(',')[0]}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def expected_request(cfg) -> tuple[int, int, int]:
    """One SLURM task per DDP rank: nodes x devices tasks, a GPU per task."""
    return int(cfg.trainer.num_nodes), int(cfg.trainer.devices), int(cfg.trainer.devices)


@pytest.mark.parametrize("document", ["README.md", "docs/training.md"])
def test_documented_slurm_command_requests_the_trainers_nodes_tasks_and_gpus(document: str) -> None:
    commands = documented_slurm_commands(PROJECT_ROOT / document)
    assert commands, f"no SLURM command found in {document}"
    for command in commands:
        cfg = compose_command(command)
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher"), command
        assert cfg.trainer.num_nodes == 2, command  # the examples are multi-node
        requested = (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node)
        assert requested == expected_request(cfg), command


def test_readme_slurm_example_asks_for_two_nodes_of_two_gpu_tasks() -> None:
    (command,) = documented_slurm_commands(PROJECT_ROOT / "README.md")
    launcher = compose_command(command).hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 2, 2)


def test_stock_submitit_slurm_would_ask_for_one_task_on_one_node() -> None:
    """Why the documents use the repo's launcher config: the stock one ignores the trainer."""
    cfg = compose_command("python train.py -m hydra/launcher=submitit_slurm trainer=ddp trainer.num_nodes=2")
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, None)
