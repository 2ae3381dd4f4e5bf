"""The mislabel report: series whose given label disagrees with what the pixels say.

Built from ``eval.py input=<folder> labels=...`` outputs (:mod:`modality.evaluation.predict`): the per-slice rows, the
series votes and the labels of :mod:`modality.evaluation.given_labels`. Pure tables and text here; reading
files and running the model stay in :mod:`modality.evaluation.predict`.

**Unit of the report.** The decision is the series' (its majority vote and mean probabilities: many
slices outvote one odd slice), but labels are given per file, so a row is one *series and given label*: a
series whose files all carry one label is one row; a series whose files carry two labels (a CSV that
mislabels some slices of a scan) gives two rows, each with its own ``label_files``. A file swapped alone
inside a correct series is still found, judged by its whole series' pixels.

**Order.** Rows are sorted by ``prob_given`` ascending: the series' mean probability of the *given*
label. That is the quantity a curator asks about ("how implausible is this label?"). The model's confidence
in its own answer ranks differently exactly where it matters: a series the model splits between two
other classes (CT 0.5, XR 0.48, given MR 0.02) is a near-certain mislabel although the model is unsure
which class is right, and a confident vote that only narrowly beats the given label (CT 0.55, given MR
0.44) is a weak case although its confidence is higher than the first. Ties (saturated probabilities) go to
the higher vote confidence, then to the series id, so the order is reproducible.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from modality.evaluation.given_labels import GivenLabel, normalised_path
from modality.labels.class_map import OTHER

MISLABEL_COLUMNS = (
    "rank",
    "series",
    "source",
    "given_label",
    "label_source",
    "label_files",
    "voted",
    "prob_given",
    "confidence",
    "vote_share",
    "series_files",
    "slices",
    "header_modality",
    "header_class",
    "series_from",
    "middle_path",
    "middle_frame",
)
#: Where a labelled file outside the input folder is counted (a CSV may name any absolute path).
OUTSIDE_INPUT = "(outside input)"
THUMBNAIL_PX = 96


def source_of(path: str, root: Path) -> str:
    """The first path component under the input folder: the pool's source (site, dataset, archive).

    Files directly in the input folder (or a single-file input) count as ``.``."""
    relative = os.path.relpath(normalised_path(path), normalised_path(root))
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return OUTSIDE_INPUT
    parts = Path(relative).parts
    return parts[0] if len(parts) > 1 else "."


def middle_slice(members: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The middle slice in (path, frame) order: in a volume the mid-volume slice, in a DICOM series a
    mid-series file, for one image the image."""
    ordered = sorted(members, key=lambda r: (str(r["path"]), int(r["frame"])))
    return ordered[len(ordered) // 2]


def label_units(
    rows: Sequence[Mapping[str, Any]],
    votes: Sequence[Mapping[str, Any]],
    labels: Mapping[str, GivenLabel],
    root: Path,
) -> list[dict[str, Any]]:
    """One row per series and given label (see the module docstring), with the series' decision.

    ``rows``: predictions.csv rows; ``votes``: series_votes rows; ``labels``: the final label of each
    predicted file (:func:`modality.evaluation.given_labels.complete_with_headers`). Files without a label are
    left out here (they are listed as label problems)."""
    by_series: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_series[str(row["series"])].append(row)
    units = []
    for vote in votes:
        series = str(vote["series"])
        groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for row in by_series[series]:
            given = labels.get(str(row["path"]))
            if given is not None and given.label:
                groups[given.label].append(row)
        for label, members in sorted(groups.items()):
            files = sorted({str(r["path"]) for r in members})
            sources = Counter(labels[f].source for f in files)
            middle = middle_slice(members)
            prob_given, disagrees = given_label_support(label, vote)
            units.append(
                {
                    "series": series,
                    "source": source_of(files[0], root),
                    "given_label": label,
                    "label_source": "+".join(sorted(sources)),
                    "label_files": len(files),
                    "voted": vote["voted"],
                    "prob_given": round(prob_given, 6),
                    "confidence": vote["confidence"],
                    "vote_share": vote["vote_share"],
                    "series_files": vote["files"],
                    "slices": vote["slices"],
                    "header_modality": vote["header_modality"],
                    "header_class": vote["header_class"],
                    "series_from": vote["series_from"],
                    "middle_path": middle["path"],
                    "middle_frame": middle["frame"],
                    "disagrees": int(disagrees),
                }
            )
    return units


def given_label_support(label: str, vote: Mapping[str, Any]) -> tuple[float, bool]:
    """``(prob_given, disagrees)`` of a given label against a series' vote.

    A class label is judged by the pixels: the vote's mean probability of that class, and whether the vote
    or the series' decision names something else (a series whose header names a non-target modality is
    decided ``other`` whatever its pixels say). An ``other`` label agrees only with an ``other`` decision;
    against a pixel answer its support is the probability mass the vote leaves to the other classes (1 -
    the vote's mean probability): the more certain the pixels are of a class, the less plausible "none"."""
    decision = str(vote.get("decision") or vote["voted"])
    if label == OTHER:
        if decision == OTHER:
            return 1.0, False
        return 1.0 - float(vote["mean_probability"]), True
    return float(vote[f"mean_prob_{label}"]), label != vote["voted"] or decision == OTHER


def rank_mislabels(units: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The disagreeing units, most implausible label first (order: see the module docstring), ranked 1..n."""
    flagged = [dict(u) for u in units if u["disagrees"]]
    flagged.sort(key=lambda u: (float(u["prob_given"]), -float(u["confidence"]), str(u["series"])))
    for rank, unit in enumerate(flagged, start=1):
        unit["rank"] = rank
    return flagged


def source_summary(
    files: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    unreadable_files: Iterable[str],
    votes: Sequence[Mapping[str, Any]],
    root: Path,
    units: Sequence[Mapping[str, Any]] | None = None,
    problems: Sequence[Mapping[str, str]] = (),
) -> dict[str, dict[str, int]]:
    """Counts per source folder: files (every path under the input), predicted and unreadable files,
    series and slices; with labels also labelled series, disagreements and each kind of label problem.

    A series is counted under the source of its first file (a SeriesInstanceUID copied into two sources
    is one series)."""
    table: dict[str, dict[str, int]] = defaultdict(Counter)  # type: ignore[arg-type]
    for path in files:
        table[source_of(path, root)]["files"] += 1
    for path in {str(r["path"]) for r in rows}:
        table[source_of(path, root)]["files_predicted"] += 1
    for path in set(unreadable_files):
        table[source_of(path, root)]["files_unreadable"] += 1
    for row in rows:
        table[source_of(str(row["path"]), root)]["slices"] += 1
    for vote in votes:
        table[str(vote["source"])]["series"] += 1
    if units is not None:
        labelled: dict[str, set[str]] = defaultdict(set)
        flagged: dict[str, set[str]] = defaultdict(set)
        for unit in units:
            labelled[str(unit["source"])].add(str(unit["series"]))
            if unit["disagrees"]:
                flagged[str(unit["source"])].add(str(unit["series"]))
        for source in set(labelled) | set(table):
            table[source]["labelled_series"] = len(labelled.get(source, ()))
            table[source]["disagreeing_series"] = len(flagged.get(source, ()))
        for problem in problems:
            key = str(problem["problem"]).replace(" ", "_")
            table[source_of(str(problem["path"]), root)][key] += 1
    return {source: dict(counts) for source, counts in sorted(table.items())}


def thumbnail_png(image: np.ndarray, size: int = THUMBNAIL_PX) -> bytes:
    """A PNG of a uint8 slice no larger than ``size`` pixels a side (small enough to inline by the hundred)."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: middle; }
th { background: #eef; }
td.num { text-align: right; }
img.thumb { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; background: #000; }
.path { font-family: monospace; font-size: 11px; word-break: break-all; max-width: 40em; }
.note { color: #a40; }
"""


def _cell(value: Any, numeric: bool = False) -> str:
    text = f"{value:.3g}" if isinstance(value, float) else html.escape(str(value))
    return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"


def render_mislabel_page(
    mislabels: Sequence[Mapping[str, Any]],
    thumbnails: Mapping[int, bytes],
    per_source: Mapping[str, Mapping[str, int]],
    totals: Mapping[str, Any],
    max_rows: int,
) -> str:
    """One self-contained HTML page (thumbnails inlined as base64 PNG): the per-source counts, then the
    first ``max_rows`` flagged series in report order, each with its middle slice as the model saw it.

    ``thumbnails``: rank -> PNG bytes; a rank without one (its file could not be re-read) says so."""
    counts = ["files", "files_predicted", "series", "labelled_series", "disagreeing_series"]
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in ["source", *counts])
    source_rows = "".join(
        "<tr>" + _cell(source) + "".join(_cell(row.get(c, 0), True) for c in counts) + "</tr>"
        for source, row in per_source.items()
    )
    shown = list(mislabels[:max_rows])
    table_rows = []
    for unit in shown:
        png = thumbnails.get(int(unit["rank"]))
        picture = (
            f'<img class="thumb" alt="middle slice" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            if png
            else '<span class="note">not re-readable</span>'
        )
        table_rows.append(
            "<tr>"
            + _cell(unit["rank"], True)
            + f"<td>{picture}</td>"
            + _cell(unit["given_label"])
            + _cell(unit["voted"])
            + _cell(float(unit["prob_given"]), True)
            + _cell(float(unit["confidence"]), True)
            + _cell(f"{unit['label_files']} / {unit['series_files']} files, {unit['slices']} slices")
            + _cell(unit["label_source"])
            + _cell(unit["header_modality"])
            + _cell(unit["source"])
            + f'<td class="path">{html.escape(str(unit["middle_path"]))} [{unit["middle_frame"]}]'
            f"<br>series {html.escape(str(unit['series']))}</td>" + "</tr>"
        )
    omitted = len(mislabels) - len(shown)
    note = (
        f'<p class="note">{omitted} more flagged series are listed in mislabels.csv only '
        f"(mislabel_html_max={max_rows}).</p>"
        if omitted > 0
        else ""
    )
    summary = ", ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in totals.items())
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Mislabel report</title><style>{PAGE_STYLE}</style></head>
<body>
<h1>Series whose given label disagrees with the pixels</h1>
<p>{summary}. Written {stamp}. Sorted by the series' mean probability of the given label, lowest first;
confidence = mean probability of the voted class. Thumbnails: the middle slice as the model saw it.</p>
<h2>Per source</h2>
<table><thead><tr>{head}</tr></thead><tbody>{source_rows}</tbody></table>
<h2>Flagged series ({len(mislabels)})</h2>
{note}
<table><thead><tr><th>rank</th><th>middle slice</th><th>given</th><th>voted</th><th>p(given)</th>
<th>confidence</th><th>size</th><th>label from</th><th>header</th><th>source</th><th>path, series</th></tr></thead>
<tbody>{"".join(table_rows)}</tbody></table>
</body></html>
"""
