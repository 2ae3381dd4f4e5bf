"""The reference study's figures, drawn from plain data (no file reading here), each saved as one PNG.

Every function takes already-collected numbers and a path, so the same drawing serves ``eval.py`` (one
confusion matrix) and ``python -m modality.reports`` (a whole sweep). Matplotlib runs on the Agg backend:
reports are made on headless machines.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110


def _wrapped(labels: Sequence[str], width: int = 16) -> list[str]:
    """Run labels on several short lines: rotated long labels run off the figure's edge."""
    return [textwrap.fill(str(label), width, break_long_words=False) for label in labels]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def draw_confusion(
    ax: Axes,
    counts: np.ndarray,
    classes: Sequence[str],
    title: str,
    normalise: bool,
    fontsize: float | None = None,
) -> None:
    """Heatmap, rows = true class; colour is the row-normalised share so small classes stay readable.

    The one confusion drawing: eval's PNG, the sweep report's grid and the TensorBoard figure logged during
    training (:func:`modality.metrics.classification.confusion_figure`, which passes a smaller ``fontsize``
    for the cell labels) all call it.
    """
    counts = np.asarray(counts)
    support = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, support, out=np.zeros(counts.shape, float), where=support > 0)
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            text = f"{shares[i, j]:.2f}" if normalise else f"{int(counts[i, j])}"
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)


def confusion_counts_and_recall(
    counts: np.ndarray, classes: Sequence[str], path: Path, title: str = ""
) -> Path:
    """Counts and row-normalised shares (recall) side by side, saved as one PNG (eval's confusion_matrix.png)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    draw_confusion(axes[0], counts, classes, f"{title} counts".strip(), normalise=False)
    draw_confusion(axes[1], counts, classes, f"{title} row-normalised (recall)".strip(), normalise=True)
    return _save(fig, path)


def confusion_grid(matrices: Mapping[str, tuple[np.ndarray, Sequence[str]]], path: Path) -> Path:
    """One row-normalised matrix (annotated with counts) per run, in a grid."""
    n = len(matrices)
    cols = min(3, max(n, 1))
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.2 * rows), squeeze=False)
    for ax, (label, (counts, classes)) in zip(axes.ravel(), matrices.items(), strict=False):
        draw_confusion(ax, counts, classes, label, normalise=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return _save(fig, path)


def images_per_class_per_split(
    by_split: Mapping[str, Mapping[str, int]], classes: Sequence[str], path: Path
) -> Path:
    """Grouped bars: samples of each class in each split (log scale, as in the study, when counts span decades)."""
    splits = list(by_split)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(splits), 1)
    x = np.arange(len(classes))
    peak = 1
    for k, split in enumerate(splits):
        values = [by_split[split].get(c, 0) for c in classes]
        peak = max(peak, *values) if values else peak
        bars = ax.bar(x + (k - (len(splits) - 1) / 2) * width, values, width, label=split)
        ax.bar_label(bars, fontsize=7)
    nonzero = [v for split in splits for v in by_split[split].values() if v]
    if nonzero and max(nonzero) / max(min(nonzero), 1) > 100:
        ax.set_yscale("log")
    ax.set_xticks(x, classes)
    ax.set_ylabel("images")
    ax.set_title("Images per class per split")
    ax.legend()
    return _save(fig, path)


def accuracy_per_model(
    labels: Sequence[str], series: Mapping[str, Sequence[float | None]], path: Path, title: str
) -> Path:
    """Grouped bars per run, one bar per named series (e.g. train / val / test accuracy); None = missing."""
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels) + 2), 4.2))
    names = list(series)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(labels))
    for k, name in enumerate(names):
        values = [np.nan if v is None else v for v in series[name]]
        bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, _wrapped(labels), fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach 1.0
    return _save(fig, path)


def accuracy_per_epoch(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: Path) -> Path:
    """One panel per run: train and val accuracy at the end of every epoch (the study's Figs 6.5/6.6)."""
    n = max(len(curves), 1)
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (label, lines) in zip(axes.ravel(), curves.items(), strict=False):
        for name, points in lines.items():
            if points:
                epochs, values = zip(*points, strict=True)
                ax.plot(epochs, values, marker="o", label=name)
        ax.set_title(label, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
    for ax in axes.ravel()[len(curves) :]:
        ax.axis("off")
    return _save(fig, path)


def accuracy_against_l2(points: Mapping[str, Sequence[tuple[float, float]]], path: Path, metric: str) -> Path:
    """Accuracy against weight decay, one line per model (the study's Fig 6.7 / Table 7.3)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for model, pairs in points.items():
        # every run is a marker; the line joins the mean per L2 value (repeated runs share an x)
        by_l2: dict[float, list[float]] = {}
        for l2, value in pairs:
            by_l2.setdefault(l2, []).append(value)
        xs = sorted(by_l2)
        (line,) = ax.plot(xs, [float(np.mean(by_l2[x])) for x in xs], label=model)
        ax.scatter([p[0] for p in pairs], [p[1] for p in pairs], color=line.get_color(), zorder=3)
    ax.set_xlabel("L2 penalty (weight_decay)")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{metric} against L2 penalty")
    ax.legend(fontsize=8)
    return _save(fig, path)


def training_time_per_model(labels: Sequence[str], seconds: Sequence[float | None], path: Path) -> Path:
    """Bars of training wall time, in the unit that keeps the numbers readable."""
    values = np.array([np.nan if s is None else s for s in seconds], dtype=float)
    peak = np.nanmax(values) if np.isfinite(values).any() else 0.0
    unit, divisor = (
        ("hours", 3600.0) if peak >= 7200 else ("minutes", 60.0) if peak >= 120 else ("seconds", 1.0)
    )
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) + 2), 4))
    bars = ax.bar(range(len(labels)), values / divisor, color="tab:purple")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(labels)), _wrapped(labels), fontsize=8)
    ax.set_ylabel(f"training time ({unit})")
    ax.set_title("Training time per model")
    return _save(fig, path)
