"""Training-time classification metrics: one confusion matrix per stage, everything else derived from it.

A single ``MulticlassConfusionMatrix`` per stage syncs once at epoch end under DDP (no per-step collective,
which uneven evaluation shares across ranks would deadlock on) and yields accuracy, balanced accuracy and
per-class recall with the same definitions as ``eval.py`` (:func:`modality.metrics.evaluation.classification_summary`:
balanced accuracy = mean recall over the classes present in the targets, as scikit-learn and the reference
study define it).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # TensorBoard figures are rendered off-screen, also on headless cluster nodes

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassConfusionMatrix

from modality.metrics.evaluation import classification_summary


def confusion_metric(num_classes: int) -> MulticlassConfusionMatrix:
    """Rows = true class, columns = predicted class (the orientation eval.py writes)."""
    return MulticlassConfusionMatrix(num_classes=num_classes)


def scalar_metrics(confusion: torch.Tensor | np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """``acc``, ``balanced_acc`` and ``recall_<class>`` (classes with support only) from a confusion matrix."""
    counts = (
        confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    )
    summary = classification_summary(counts, classes)
    scalars = {"acc": summary["accuracy"], "balanced_acc": summary["balanced_accuracy"]}
    for name, row in summary["per_class"].items():
        if row["support"] > 0:
            scalars[f"recall_{name}"] = row["recall"]
    return scalars


def confusion_figure(confusion: torch.Tensor | np.ndarray, classes: Sequence[str], title: str = "") -> Figure:
    """Counts with the row-normalised share as colour, rows = true class (the recall view)."""
    counts = (
        confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    )
    support = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, support, out=np.zeros(counts.shape, dtype=float), where=support > 0)
    size = 1.2 + 0.7 * len(classes)
    figure, axes = plt.subplots(figsize=(size, size), dpi=100)
    axes.imshow(shares, vmin=0.0, vmax=1.0, cmap="Blues")
    axes.set_xticks(range(len(classes)), labels=list(classes))
    axes.set_yticks(range(len(classes)), labels=list(classes))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row in range(len(classes)):
        for column in range(len(classes)):
            colour = "white" if shares[row, column] > 0.5 else "black"
            axes.text(
                column, row, str(int(counts[row, column])), ha="center", va="center", color=colour, fontsize=8
            )
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure
