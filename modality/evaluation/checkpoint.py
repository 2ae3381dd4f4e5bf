"""A trained checkpoint and what travels with it: its run folder, its ``data_info``, the preprocessing and label
maps stored in it, and the fusion calibration fitted beside it.

Both evaluation jobs start here: test-shard evaluation (:mod:`modality.evaluation.shard_split`) and raw-file
prediction (:mod:`modality.evaluation.predict`). Checkpoints load with ``weights_only=True``: a checkpoint
is untrusted input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from modality.intensity.pipeline import Preprocess
from modality.intensity.value_stats import VALUE_FEATURES
from modality.labels import BodyPartMap, ClassMap
from modality.models.fusion import FusionCalibration

BEST = "best.ckpt"
LAST = "last.ckpt"


@dataclass(frozen=True)
class CheckpointSource:
    """The checkpoint to load and, when it sits in a training run folder, that folder."""

    checkpoint: Path
    run_dir: Path | None


def resolve_checkpoint(ckpt_path: str | Path) -> CheckpointSource:
    """A ``.ckpt`` file, or a run folder -> its ``checkpoints/best.ckpt`` (run_summary's best_ckpt as fallback)."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        candidate = path / "checkpoints" / BEST
        if not candidate.is_file():
            summary = _read_json(path / "run_summary.json") or {}
            named = summary.get("best_ckpt")
            if named and Path(named).is_file():
                candidate = Path(named)
            else:
                present = sorted(p.name for p in (path / "checkpoints").glob("*.ckpt"))
                raise FileNotFoundError(
                    f"run folder {path} has no checkpoints/{BEST} (checkpoints present: {present or 'none'})"
                )
        return CheckpointSource(candidate, path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint or run folder at {path}")
    parent = path.parent.parent if path.parent.name == "checkpoints" else None
    run_dir = parent if parent is not None and (parent / ".hydra" / "config.yaml").is_file() else None
    return CheckpointSource(path, run_dir)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_data_dir(run_dir: Path | None) -> str | None:
    """The training data folder recorded by the run (``.hydra/config.yaml`` data.data_dir, else run_summary)."""
    if run_dir is None:
        return None
    config_path = run_dir / ".hydra" / "config.yaml"
    if config_path.is_file():
        from omegaconf import OmegaConf

        try:
            value = OmegaConf.select(
                OmegaConf.load(config_path), "data.data_dir", throw_on_resolution_failure=True
            )
        except Exception:  # interpolations that need a live Hydra context; fall back below
            value = None
        if value:
            return str(value)
    summary = _read_json(run_dir / "run_summary.json") or {}
    return str(summary["data_dir"]) if summary.get("data_dir") else None


def load_classifier(
    checkpoint: Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained module (eval mode) and its ``data_info``; ``weights_only=True``: a checkpoint is untrusted."""
    from modality.models import ModalityClassifier

    try:
        model = ModalityClassifier.load_from_checkpoint(
            str(checkpoint), map_location="cpu", weights_only=True
        )
    except RuntimeError as error:
        if "value_head" in str(error) and "size mismatch" in str(error):
            raise ValueError(
                f"{checkpoint}: its value-statistics head reads another set of statistics than this version "
                f"records ({len(VALUE_FEATURES)}: {', '.join(VALUE_FEATURES)}); prepare the data again and "
                "retrain, or evaluate with the version that trained it"
            ) from None
        raise
    data_info = getattr(model, "data_info", None) or model.hparams.get("data_info")
    if not data_info:
        raise ValueError(f"{checkpoint} holds no data_info: it cannot say how its inputs were prepared")
    model.eval()
    return model.to(device), dict(data_info)


def find_calibration(
    requested: str | None, source: CheckpointSource
) -> tuple[FusionCalibration | None, Path | None]:
    """``calibration=<file>`` when given (``none`` for the fixed fusion rule); else ``calibration.json`` in
    the checkpoint's run folder when one was fitted there; else None (the fixed ``cnn_weight`` rule)."""
    if requested is not None and str(requested).lower() == "none":
        return None, None
    if requested:
        path = Path(str(requested))
        if not path.is_file():
            raise FileNotFoundError(f"calibration file not found: {path}")
        return FusionCalibration.load(path), path
    # The run folder, or for a bare checkpoint the folder above its checkpoints/ (a run moved elsewhere).
    parent = source.checkpoint.parent
    for folder in (source.run_dir, parent.parent if parent.name == "checkpoints" else None):
        if folder is not None and (Path(folder) / "calibration.json").is_file():
            path = Path(folder) / "calibration.json"
            return FusionCalibration.load(path), path
    return None, None


# ---------------------------------------------------------------- the stored preprocessing


def stored_label_maps(stored: Mapping[str, Any]) -> tuple[ClassMap, BodyPartMap]:
    """The class map and body-part map a ``preprocess`` block recorded (the defaults when it recorded none)."""
    class_map = ClassMap.from_config(stored["class_map"]) if stored.get("class_map") else ClassMap.default()
    body_part_map = (
        BodyPartMap.from_config(stored["body_part_map"])
        if stored.get("body_part_map")
        else BodyPartMap.default()
    )
    return class_map, body_part_map


def preprocess_differences(
    checkpoint_preprocess: Mapping[str, Any], data_preprocess: Mapping[str, Any]
) -> list[str]:
    """Keys of the slice preprocessing on which the evaluated shards differ from what the model was trained on.

    Both stored forms are read as :class:`~modality.intensity.pipeline.Preprocess`, so ``40`` and ``40.0``,
    the order of windows or a key left at its default do not count. A form this version cannot read is
    compared as stored."""
    try:
        trained, data = Preprocess.from_dict(checkpoint_preprocess), Preprocess.from_dict(data_preprocess)
    except (ValueError, TypeError):
        keys = [f.name for f in fields(Preprocess)]
        return [key for key in keys if checkpoint_preprocess.get(key) != data_preprocess.get(key)]
    return [f.name for f in fields(Preprocess) if getattr(trained, f.name) != getattr(data, f.name)]
