"""How the evaluation jobs write their tables and pages: whole or not at all, file names that are not UTF-8
escaped rather than failing the run, and where an ``eval.py`` run writes when no ``out=`` is given."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modality.sources.folders import printable


def output_folder(cfg: Any, default: Path | None) -> Path:
    """``out=`` when given, else ``default`` (a run's ``eval/``), else Hydra's output folder."""
    if cfg.get("out"):
        return Path(str(cfg.out))
    if default is not None:
        return default
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` under a temporary name, then rename: a crash never leaves half a table. Text goes
    through :func:`~modality.sources.folders.printable`, so a file name that is not UTF-8 is written
    with its odd bytes as ``\\xff`` instead of failing the run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(
            {key: printable(value) if isinstance(value, str) else value for key, value in row.items()}
            for row in rows
        )
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> None:
    """Whole or not at all, as :func:`write_csv`; odd bytes of file names are escaped (:func:`printable`)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(printable(text), encoding="utf-8")
    os.replace(tmp, path)


def write_confusion_csv(path: Path, matrix: Sequence[Sequence[float]], classes: Sequence[str]) -> Path:
    """Rows = true class (first column), columns = predicted class."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, matrix, strict=True):
            writer.writerow([name, *row])
    return path
