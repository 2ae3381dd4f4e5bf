"""One self-contained HTML page: the runs table and every figure inlined as base64 PNG.

Self-contained so it can be mailed, attached to an issue or opened from an archive without its folder.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

FIGURE_TITLES = {
    "images_per_class_per_split": "Images per class per split",
    "accuracy_per_model": "Accuracy per model (train = last epoch; val; test)",
    "balanced_accuracy_per_model": "Balanced accuracy per model",
    "accuracy_per_epoch": "Train and validation accuracy per epoch",
    "accuracy_against_l2": "Accuracy against L2 penalty",
    "confusion_matrices": "Confusion matrices (rows = true class; colour = row share)",
    "training_time_per_model": "Training time per model",
}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1600px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #eef; white-space: normal; }
td:first-child, td:nth-child(2) { text-align: left; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #a40; }
"""


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def table_html(table: pd.DataFrame) -> str:
    # underscores become spaces so long column names can wrap
    head = "".join(f"<th>{html.escape(str(c).replace('_', ' '))}</th>" for c in table.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
        for row in table.itertuples(index=False)
    )
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def inline_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_page(
    title: str,
    table: pd.DataFrame,
    figures: Mapping[str, Path],
    skipped: Mapping[str, str],
    notes: Mapping[str, Sequence[str]],
    sources: Sequence[Path],
) -> str:
    """The whole page as a string."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Runs from: " + ", ".join(f"<code>{html.escape(str(s))}</code>" for s in sources) + "<br>"
        f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.</p>",
        "<h2>Runs</h2>",
        table_html(table),
    ]
    if notes:
        parts.append("<ul>")
        for label, messages in notes.items():
            for message in messages:
                parts.append(f'<li class="note">{html.escape(label)}: {html.escape(message)}</li>')
        parts.append("</ul>")
    for name, path in figures.items():
        caption = html.escape(FIGURE_TITLES.get(name, name))
        parts.append(
            f'<figure id="{html.escape(name)}"><figcaption><h2>{caption}</h2></figcaption>'
            f'<img alt="{caption}" src="{inline_png(path)}"></figure>'
        )
    for name, reason in skipped.items():
        parts.append(
            f'<p class="note">Not drawn: {html.escape(FIGURE_TITLES.get(name, name))} ({html.escape(reason)})</p>'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
