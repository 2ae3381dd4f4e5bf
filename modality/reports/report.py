"""Collect training runs into one table and the reference study's figures.

A *run* is a folder with ``run_summary.json`` (train.py writes it at the end, also for failed runs); a
multirun folder is searched recursively for them. Per run the report also reads ``csv/**/metrics.csv``
(per-epoch train/val accuracy), ``eval/metrics.json`` when ``eval.py`` has been run on it (the trusted test
numbers, confusion matrix and ms/image), and the data's ``summary.json`` (images per class per split).
Test numbers come from ``eval/metrics.json`` when present, else from ``run_summary.json["test"]``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modality.paths import PROJECT_ROOT
from modality.reports import figures

RUN_SUMMARY = "run_summary.json"
EVAL_DIR = "eval"

TABLE_COLUMNS = [
    "run",
    "label",
    "model",
    "dropout",
    "weight_decay",
    "epochs",
    "val_acc",
    "val_balanced_acc",
    "test_acc",
    "test_balanced_acc",
    "val_region_balanced_acc",  # body-part head (model.body_part=true); empty for runs without it
    "test_region_balanced_acc",
    "train_time_s",
    "ms_per_image_b1",
    "ms_per_image_b128",
    "status",
]


@dataclass
class RunRecord:
    """Everything the report knows about one run."""

    path: Path
    label: str
    name: str  # the run folder, relative to the folders the report was asked for (unique per run)
    summary: dict[str, Any]
    evaluation: dict[str, Any] | None
    epochs: pd.DataFrame | None  # one row per epoch, columns train/acc, val/acc, ...
    notes: list[str] = field(default_factory=list)

    def value(self, key: str) -> Any:
        return self.summary.get(key)

    def test_metrics(self) -> dict[str, Any] | None:
        if self.evaluation is not None:
            return self.evaluation
        test = self.summary.get("test")
        return test if isinstance(test, dict) else None


def find_runs(roots: Iterable[Path]) -> list[Path]:
    """Run folders under the given run or multirun folders, in a stable order, without repeats."""
    found: dict[Path, None] = {}
    for root in roots:
        if (root / RUN_SUMMARY).is_file():
            found[root.resolve()] = None
            continue
        for summary in sorted(root.rglob(RUN_SUMMARY), key=lambda p: _natural_key(str(p))):
            found[summary.parent.resolve()] = None
    return list(found)


def _natural_key(text: str) -> list[Any]:
    """Sort multirun job folders 0, 1, ..., 10 rather than 0, 1, 10, 2."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_epoch_metrics(run_dir: Path) -> pd.DataFrame | None:
    """Lightning's CSVLogger writes one row per logging call; fold them to one row per epoch (last value)."""
    files = sorted((run_dir / "csv").rglob("metrics.csv")) if (run_dir / "csv").is_dir() else []
    if not files:
        return None
    frame = pd.read_csv(files[-1])
    if "epoch" not in frame.columns or frame.empty:
        return None
    frame = frame.dropna(subset=["epoch"])
    frame["epoch"] = frame["epoch"].astype(int)
    return frame.groupby("epoch").last().sort_index()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_run(run_dir: Path) -> RunRecord:
    """Read one run folder; missing optional files become notes, not errors."""
    summary = _read_json(run_dir / RUN_SUMMARY) or {}
    notes = []
    if not summary:
        notes.append("run_summary.json unreadable")
    evaluation = _read_json(run_dir / EVAL_DIR / "metrics.json")
    epochs = read_epoch_metrics(run_dir)
    if epochs is None:
        notes.append("no csv/metrics.csv")
    if summary.get("status") not in (None, "ok"):
        notes.append(f"status {summary.get('status')}: {summary.get('error')}")
    return RunRecord(run_dir, run_dir.name, run_dir.name, summary, evaluation, epochs, notes)


def assign_run_names(runs: Sequence[RunRecord]) -> None:
    """Each run's folder relative to the deepest folder holding them all: a multirun's jobs read ``0``, ``1``,
    runs from several sweeps ``<sweep>/0``; a single run keeps its folder name."""
    if len(runs) < 2:
        for run in runs:
            run.name = run.path.name
        return
    common = Path(os.path.commonpath([str(run.path) for run in runs]))
    for run in runs:
        run.name = run.path.relative_to(common).as_posix() or run.path.name


def format_hyperparameter(value: Any) -> str:
    """One spelling per value: a Hydra override ``weight_decay=0`` stores the int 0, an experiment's YAML
    ``0.0`` the float; both read ``0`` (and 0.010 reads ``0.01``)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int | float):
        return f"{float(value):g}"
    return str(value)


def assign_labels(runs: Sequence[RunRecord]) -> None:
    """Label runs by model, adding dropout/L2 only where models repeat, and the run folder where still
    ambiguous. Call :func:`assign_run_names` first."""
    models = [str(r.value("model")) for r in runs]
    for run, model in zip(runs, models, strict=True):
        run.label = model
        if models.count(model) > 1:
            dropout, l2 = (format_hyperparameter(run.value(k)) for k in ("dropout", "weight_decay"))
            run.label = f"{model} d={dropout} L2={l2}"
    labels = [r.label for r in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = f"{run.label} [{run.name}]"


def _metric(block: dict[str, Any] | None, *names: str) -> float | None:
    if not block:
        return None
    for name in names:
        value = block.get(name)
        if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
    return None


def _ms_per_image(run: RunRecord, batch: int) -> float | None:
    timing = (run.evaluation or {}).get("timing", {})
    entry = timing.get("batches", {}).get(str(batch)) if isinstance(timing, dict) else None
    return float(entry["ms_per_image"]) if entry and entry.get("ms_per_image") is not None else None


def runs_table(runs: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per run with the columns of TABLE_COLUMNS."""
    rows = []
    for run in runs:
        val = run.value("val") if isinstance(run.value("val"), dict) else None
        test = run.test_metrics()
        rows.append(
            {
                "run": run.name,
                "label": run.label,
                "model": run.value("model"),
                "dropout": run.value("dropout"),
                "weight_decay": run.value("weight_decay"),
                "epochs": run.value("epochs"),
                "val_acc": _metric(val, "acc", "accuracy"),
                "val_balanced_acc": _metric(val, "balanced_acc", "balanced_accuracy"),
                "test_acc": _metric(test, "accuracy", "acc"),
                "test_balanced_acc": _metric(test, "balanced_accuracy", "balanced_acc"),
                "val_region_balanced_acc": _metric(val, "region_balanced_acc"),
                # eval.py's metrics.json holds a region block; train.py's test block the flat key
                "test_region_balanced_acc": _metric((test or {}).get("region"), "balanced_accuracy")
                if isinstance((test or {}).get("region"), dict)
                else _metric(test, "region_balanced_acc"),
                "train_time_s": _metric(run.summary, "train_time_s"),
                "ms_per_image_b1": _ms_per_image(run, 1),
                "ms_per_image_b128": _ms_per_image(run, 128),
                "status": run.value("status"),
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' to_markdown needs tabulate, which we do not ship)."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def _resolve_data_dir(value: Any, run_dir: Path) -> Path | None:
    if not value:
        return None
    path = Path(str(value))
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path, run_dir / path]
    return next((c for c in candidates if (c / "summary.json").is_file()), None)


def class_counts_by_split(runs: Sequence[RunRecord]) -> tuple[dict[str, dict[str, int]], list[str]] | None:
    """Images per class per split from the first run's data summary.json that can be found."""
    for run in runs:
        data_dir = _resolve_data_dir(run.value("data_dir"), run.path)
        summary = _read_json(data_dir / "summary.json") if data_dir else None
        if summary and "splits" in summary:
            by_split = {name: dict(block.get("by_class", {})) for name, block in summary["splits"].items()}
            return by_split, list(summary.get("classes", []))
    return None


def _train_accuracy_last_epoch(run: RunRecord) -> float | None:
    if run.epochs is None:
        return None
    for column in ("train/acc_epoch", "train/acc"):
        if column in run.epochs.columns:
            series = run.epochs[column].dropna()
            if len(series):
                return float(series.iloc[-1])
    return None


def _epoch_curves(run: RunRecord) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch train/val accuracy, cut at the last epoch that trained.

    train.py validates and tests the best checkpoint after fitting, and Lightning logs that at
    ``current_epoch`` = last epoch + 1; that point is not part of the training curve.
    """
    curves: dict[str, list[tuple[int, float]]] = {}
    if run.epochs is None:
        return curves
    train_column = next((c for c in ("train/acc_epoch", "train/acc") if c in run.epochs.columns), None)
    last_trained = int(run.epochs[train_column].dropna().index.max()) if train_column else None
    for name, column in (("train", train_column), ("val", "val/acc")):
        if column and column in run.epochs.columns:
            series = run.epochs[column].dropna()
            if last_trained is not None:
                series = series[series.index <= last_trained]
            curves[name] = [(int(e), float(v)) for e, v in series.items()]
    return curves


def build_report(roots: Sequence[Path], out_dir: Path) -> dict[str, Any]:
    """Write runs.csv, runs.md, the figures and report.html into ``out_dir``; return what was made."""
    from modality.reports.html import render_page

    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [load_run(path) for path in find_runs(roots)]
    if not runs:
        raise FileNotFoundError(f"no {RUN_SUMMARY} under {', '.join(map(str, roots))}")
    assign_run_names(runs)
    assign_labels(runs)
    table = runs_table(runs)
    table.to_csv(out_dir / "runs.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    markdown = to_markdown(table)
    (out_dir / "runs.md").write_text(markdown)

    made: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    labels = [r.label for r in runs]

    counts = class_counts_by_split(runs)
    if counts:
        made["images_per_class_per_split"] = figures.images_per_class_per_split(
            counts[0], counts[1], out_dir / "images_per_class_per_split.png"
        )
    else:
        skipped["images_per_class_per_split"] = "no data summary.json found from run_summary data_dir"

    made["accuracy_per_model"] = figures.accuracy_per_model(
        labels,
        {
            "train (last epoch)": [_train_accuracy_last_epoch(r) for r in runs],
            "val": table["val_acc"].tolist(),
            "test": table["test_acc"].tolist(),
        },
        out_dir / "accuracy_per_model.png",
        "Accuracy per model",
    )
    made["balanced_accuracy_per_model"] = figures.accuracy_per_model(
        labels,
        {"val": table["val_balanced_acc"].tolist(), "test": table["test_balanced_acc"].tolist()},
        out_dir / "balanced_accuracy_per_model.png",
        "Balanced accuracy per model",
    )

    curves = {r.label: _epoch_curves(r) for r in runs if _epoch_curves(r)}
    if curves:
        made["accuracy_per_epoch"] = figures.accuracy_per_epoch(curves, out_dir / "accuracy_per_epoch.png")
    else:
        skipped["accuracy_per_epoch"] = "no csv/metrics.csv with train/val accuracy"

    use_test = table["test_acc"].notna().any()
    metric_column, metric_name = ("test_acc", "test accuracy") if use_test else ("val_acc", "val accuracy")
    l2_points: dict[str, list[tuple[float, float]]] = {}
    for run, row in zip(runs, table.itertuples(index=False), strict=True):
        value = getattr(row, metric_column)
        if row.weight_decay is not None and value is not None and not math.isnan(value):
            l2_points.setdefault(str(run.value("model")), []).append((float(row.weight_decay), float(value)))
    if l2_points:
        made["accuracy_against_l2"] = figures.accuracy_against_l2(
            l2_points, out_dir / "accuracy_against_l2.png", metric_name
        )
    else:
        skipped["accuracy_against_l2"] = "no run with weight_decay and accuracy"

    matrices = {}
    for run in runs:
        test = run.test_metrics() or {}
        confusion = test.get("confusion_matrix")
        if isinstance(confusion, dict) and "counts" in confusion:
            matrices[run.label] = (
                np.asarray(confusion["counts"]),
                confusion.get("classes", test.get("classes")),
            )
    if matrices:
        made["confusion_matrices"] = figures.confusion_grid(matrices, out_dir / "confusion_matrices.png")
    else:
        skipped["confusion_matrices"] = "no test confusion matrix (run eval.py on the runs)"

    made["training_time_per_model"] = figures.training_time_per_model(
        labels, table["train_time_s"].tolist(), out_dir / "training_time_per_model.png"
    )

    notes = {r.label: r.notes for r in runs if r.notes}
    html_path = out_dir / "report.html"
    html_path.write_text(render_page("modality: runs report", table, made, skipped, notes, roots))
    return {"runs": len(runs), "figures": made, "skipped": skipped, "html": html_path, "table": table}
