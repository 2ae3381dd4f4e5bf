"""One bar chart per split: images per class, stacked by dataset (top) and by body part (bottom).

The reference study showed images per modality per split as a bar chart; stacking by source makes the
imbalance the study suffered from (one repository supplying a whole class) visible at a glance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _stacked(ax, classes: Sequence[str], stacks: Mapping[str, Mapping[str, int]], title: str) -> None:
    """``stacks``: segment name -> class -> count."""
    bottoms = [0] * len(classes)
    cmap = __import__("matplotlib").colormaps["tab20"]
    for i, (name, per_class) in enumerate(sorted(stacks.items())):
        heights = [int(per_class.get(c, 0)) for c in classes]
        ax.bar(classes, heights, bottom=bottoms, label=name, color=cmap(i % 20))
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for x, total in enumerate(bottoms):
        ax.text(x, total, str(total), ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel("images")
    if stacks:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def plot_split(split: str, counts: Mapping, classes: Sequence[str], path: Path) -> Path:
    """Write ``path`` (PNG) for one split's ``summary.json["splits"][split]`` entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_dataset = counts.get("by_dataset", {})
    by_region: dict[str, dict[str, int]] = {}
    for cls, regions in counts.get("by_body_part", {}).items():
        for region, n in regions.items():
            by_region.setdefault(region, {})[cls] = n
    fig, axes = plt.subplots(2, 1, figsize=(9, 9))
    _stacked(axes[0], classes, by_dataset, f"{split}: images per class by dataset")
    _stacked(axes[1], classes, by_region, f"{split}: images per class by body part")
    fig.subplots_adjust(hspace=0.35)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path
