"""Resume a run in its own directory: ``python train.py ckpt_path=last hydra.run.dir=<run> [key=value ...]``.

What resuming means here:

- **The run's own config.** A resumed attempt trains with the run's saved ``.hydra/config.yaml``, not with
  whatever ``train.yaml``'s defaults compose today (a run trained with ``model=mnasnet`` used to be resumed
  as a resnet18 and fail on the checkpoint). Value overrides given now (``trainer.max_epochs=10``,
  ``data.num_workers=2``) apply on top and are printed. Config-group overrides (``model=vgg16``,
  ``trainer=ddp_cpu``, ``experiment=...``) that differ from the run's own choice are refused before anything
  is written: they change the recipe the checkpoint was trained with; start a new run for that.
- **The run's record is never overwritten.** Hydra writes the attempt's ``config.yaml``/``overrides.yaml``/
  ``hydra.yaml`` into ``.hydra/resumed/<time>/`` (``config.yaml`` there is the effective config of the
  attempt); the run's ``.hydra/`` files stay as the run was started.
- **Earlier metrics are kept.** Lightning's CSV logger deletes ``metrics.csv`` when it opens the folder; the
  rows up to the checkpoint resumed from are put back (rows of an epoch the checkpoint does not hold, e.g.
  the half epoch before a kill, are dropped: the resumed attempt logs that epoch again).
- ``ckpt_path=last`` needs ``hydra.run.dir`` pointing at a run that has ``checkpoints/last.ckpt``; without
  one Lightning would silently train from scratch, so it is refused.

:func:`resume_argv` runs before Hydra (in ``train.py``), because Hydra writes ``.hydra/`` before the job
starts; :func:`resumed_config` runs inside the job.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from modality.training.isolation import ISOLATED_ENV

SAVED_CONFIG = Path(".hydra") / "config.yaml"
SAVED_HYDRA = Path(".hydra") / "hydra.yaml"
RESUMED_SUBDIR = ".hydra/resumed"
_MISSING = object()


class ResumeError(ValueError):
    """A resume command that cannot do what it says (printed to the user, exit code 2)."""


def _parse(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides=list(overrides))


def _command_overrides(argv: Sequence[str]) -> list[str]:
    """The ``key=value`` / ``~key`` tokens of a command line (flags and their values left out)."""
    return [
        token for token in argv[1:] if not token.startswith("-") and ("=" in token or token.startswith("~"))
    ]


def original_choices(run_dir: Path) -> dict[str, Any] | None:
    """The config-group choices the run was composed with (``hydra.runtime.choices`` in its hydra.yaml)."""
    path = run_dir / SAVED_HYDRA
    if not path.is_file():
        return None
    choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices")
    return dict(OmegaConf.to_container(choices)) if choices is not None else None


def resume_argv(argv: Sequence[str], now: float | None = None) -> list[str]:
    """Check a resume command before Hydra composes and writes anything; return the argv to run.

    A command resumes when it gives ``ckpt_path`` and ``hydra.run.dir`` of a directory that holds a saved run
    config. Then the attempt's Hydra output goes to ``.hydra/resumed/<time>`` and conflicting group
    overrides raise :class:`ResumeError`. Other commands come back unchanged.
    """
    argv = list(argv)
    if any(flag in argv for flag in ("-m", "--multirun")) or os.environ.get(ISOLATED_ENV) == "1":
        return argv
    try:
        overrides = _parse(_command_overrides(argv))
    except Exception:  # Hydra reports malformed overrides itself, with its own message
        return argv
    values = {o.key_or_group: o for o in overrides if not o.is_delete()}
    ckpt = values.get("ckpt_path")
    ckpt_value = ckpt.value() if ckpt is not None else None
    if ckpt_value is None:
        return argv
    run_value = values["hydra.run.dir"].value() if "hydra.run.dir" in values else None
    run_dir = Path(str(run_value)) if run_value is not None and "${" not in str(run_value) else None
    if str(ckpt_value) == "last" and (run_dir is None or not (run_dir / "checkpoints/last.ckpt").is_file()):
        where = f"{run_dir} has no checkpoints/last.ckpt" if run_dir else "no hydra.run.dir was given"
        raise ResumeError(
            f"ckpt_path=last resumes a run in its own directory: give hydra.run.dir=<the run's directory> "
            f"(the one holding checkpoints/last.ckpt); {where}"
        )
    if run_dir is None or not (run_dir / SAVED_CONFIG).is_file():
        return argv  # a checkpoint file trained on into a new directory: an ordinary run
    choices = original_choices(run_dir)
    conflicts = []
    for override in overrides:
        group = override.key_or_group
        if group.startswith("hydra/") or choices is None or group not in choices or override.is_delete():
            continue
        if override.value() != choices[group]:
            conflicts.append(f"{group}={override.value()} (the run used {group}={choices[group]})")
    if conflicts:
        raise ResumeError(
            f"resuming {run_dir} with its saved config ({SAVED_CONFIG}); these overrides would change the "
            f"recipe its checkpoint was trained with: {'; '.join(conflicts)}. Resume with value overrides "
            "only (e.g. trainer.max_epochs=10), or start a new run."
        )
    relaunched_rank = os.environ.get("LOCAL_RANK", "0") != "0"
    if not relaunched_rank and "hydra.output_subdir" not in values:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now))
        argv.append(f"hydra.output_subdir={RESUMED_SUBDIR}/{stamp}")
    return argv


def is_resume(cfg: DictConfig, hydra_cfg: Any) -> bool:
    """Inside the job: this single run resumes the run saved in its output directory.

    Rank 0 of a resume writes its Hydra files under ``.hydra/resumed/``; ranks that Lightning relaunches write
    none (``output_subdir`` null) and also read the saved config (for a new run that is the config rank 0
    has just written from the same command line, so the same either way).
    """
    from hydra.types import RunMode

    if hydra_cfg.mode != RunMode.RUN or cfg.get("ckpt_path") is None or os.environ.get(ISOLATED_ENV) == "1":
        return False
    saved = Path(hydra_cfg.runtime.output_dir) / SAVED_CONFIG
    return saved.is_file() and hydra_cfg.output_subdir != ".hydra"


def resumed_config(cfg: DictConfig, hydra_cfg: Any) -> DictConfig:
    """The run's saved config with this command's value overrides on top (see the module docstring)."""
    run_dir = Path(hydra_cfg.runtime.output_dir)
    saved = OmegaConf.load(run_dir / SAVED_CONFIG)
    assert isinstance(saved, DictConfig)
    groups = set(hydra_cfg.runtime.choices)
    changed = []
    for override in _parse(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if key in groups or key.startswith("hydra"):
            continue  # group choices were checked against the run's own before Hydra started
        before = OmegaConf.select(saved, key, default=_MISSING)
        if override.is_delete():
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(saved, parent_key) if parent_key else saved
            if isinstance(parent, DictConfig) and leaf in parent:
                del parent[leaf]
                changed.append(f"~{key}")
            continue
        value = override.value()
        OmegaConf.update(saved, key, value, merge=False, force_add=True)
        after = OmegaConf.select(saved, key, default=_MISSING)
        if before is _MISSING or OmegaConf.to_container(OmegaConf.create({"v": before})) != {"v": after}:
            shown = "(new)" if before is _MISSING else before
            changed.append(f"{key}: {shown} -> {value}")
    OmegaConf.set_struct(saved, True)
    if hydra_cfg.output_subdir is not None:
        record = run_dir / str(hydra_cfg.output_subdir)
        record.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(saved, record / "config.yaml")  # the attempt's effective config, not Hydra's default
        print(
            f"[modality] resuming {run_dir} with its saved config ({SAVED_CONFIG}); "
            f"changed on top: {', '.join(changed) if changed else 'nothing'}; this attempt's record: {record}"
        )
    return saved


def checkpoint_file(cfg: DictConfig) -> Path | None:
    """The file ``ckpt_path`` names (``last`` -> the run's ``checkpoints/last.ckpt``)."""
    value = cfg.get("ckpt_path")
    if value is None:
        return None
    path = (
        Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt" if str(value) == "last" else Path(str(value))
    )
    return path if path.is_file() else None


def keep_rows_up_to(path: Path, epoch: int, global_step: int) -> list[dict[str, str]]:
    """Rows of a Lightning ``metrics.csv`` that a checkpoint saved after ``epoch`` (0-based, completed) at
    ``global_step`` already covers: rows of epochs <= ``epoch``, and epoch-less rows (the learning-rate
    monitor's) logged before ``global_step``. Later rows (an epoch cut short by a kill, or the evaluation
    after fit) are left out; the resumed attempt logs them again."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    kept = []
    for row in rows:
        row_epoch, row_step = row.get("epoch") or "", row.get("step") or ""
        try:
            if row_epoch != "":
                keep = int(float(row_epoch)) <= epoch
            else:
                keep = row_step != "" and int(float(row_step)) < global_step
        except ValueError:
            keep = False
        if keep:
            kept.append(row)
    return kept


def restore_csv_rows(loggers: Sequence[Any], ckpt: Path) -> int:
    """Put back the rows an opening CSVLogger deletes, up to the checkpoint; returns the rows kept."""
    import torch
    from pytorch_lightning.loggers import CSVLogger

    kept_total = 0
    state: dict[str, Any] | None = None
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        if state is None:
            state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        rows = keep_rows_up_to(path, int(state["epoch"]), int(state["global_step"]))
        writer = logger.experiment  # opening the writer deletes metrics.csv ...
        with path.open("w", newline="", encoding="utf-8") as handle:  # ... so it is written back
            table = csv.DictWriter(handle, fieldnames=header)
            table.writeheader()
            table.writerows(rows)
        # The writer appends under its own column list; it must be the file's header, in its order.
        writer.metrics_keys = list(header)
        kept_total += len(rows)
    return kept_total


def main_argv_or_exit(argv: Sequence[str]) -> list[str]:
    """:func:`resume_argv` for ``train.py``: a refused resume prints why and exits with code 2."""
    try:
        return resume_argv(argv)
    except ResumeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
