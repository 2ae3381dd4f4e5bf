"""Training-time classification metrics: one confusion matrix per stage, everything else derived from it.

A single ``MulticlassConfusionMatrix`` per stage syncs once at epoch end under DDP (no per-step collective,
which uneven evaluation shares across ranks would deadlock on) and yields accuracy, balanced accuracy and
per-class recall with the same definitions as ``eval.py`` (:func:`modality.metrics.scores.classification_summary`:
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

from modality.metrics.scores import classification_summary
from modality.reports.figures import draw_confusion


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
    """The TensorBoard confusion matrix: counts with the row-normalised share as colour, rows = true class
    (the recall view), drawn by eval's :func:`~modality.reports.figures.draw_confusion` on a square figure
    that grows with the number of classes."""
    counts = (
        confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    )
    size = 1.2 + 0.7 * len(classes)
    figure, axes = plt.subplots(figsize=(size, size), dpi=100)
    draw_confusion(axes, counts, classes, title, normalise=False, fontsize=8)
    figure.tight_layout()
    return figure
