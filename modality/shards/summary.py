"""``summary.json`` and ``rejects.csv``: what was written, what was not, and why.

``summary.json`` is written last and atomically, so its presence is the "prepare finished" marker that
training checks (:func:`is_prepared`). Counts are nested plain dicts with sorted keys, so two runs over the
same inputs produce identical files.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUMMARY_NAME = "summary.json"
REJECTS_NAME = "rejects.csv"
REJECT_COLUMNS = ("path", "dataset", "index", "reason", "detail")


@dataclass(frozen=True)
class Reject:
    """One rejects.csv row; ``index`` is None for a whole-file rejection."""

    path: str
    dataset: str
    index: int | None
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class WrittenSample:
    """What the summary needs to know about one written sample."""

    split: str
    cls: str
    dataset: str
    body_part: str
    path: str
    region: str = "unknown"  # the body-part head's label (modality.labels.body_parts.resolve_region)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_rejects(path: Path, rejects: Iterable[Reject]) -> None:
    rows = sorted(rejects, key=lambda r: (r.dataset, r.path, -1 if r.index is None else r.index, r.reason))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(REJECT_COLUMNS)
        for r in rows:
            writer.writerow([r.path, r.dataset, "" if r.index is None else r.index, r.reason, r.detail])
    os.replace(tmp, path)


def _sorted_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (_sorted_dict(v) if isinstance(v, Mapping) else v) for k, v in sorted(d.items())}


def split_counts(samples: Sequence[WrittenSample], split: str) -> dict[str, Any]:
    """by_class, by_dataset (dataset -> class -> n), by_body_part (class -> region -> n) and by_region (head
    region -> n, unknown included) for one split."""
    mine = [s for s in samples if s.split == split]
    by_dataset: dict[str, Counter[str]] = defaultdict(Counter)
    by_body_part: dict[str, Counter[str]] = defaultdict(Counter)
    for s in mine:
        by_dataset[s.dataset][s.cls] += 1
        by_body_part[s.cls][s.body_part] += 1
    return {
        "samples": len(mine),
        "by_class": _sorted_dict(Counter(s.cls for s in mine)),
        "by_dataset": _sorted_dict({k: dict(v) for k, v in by_dataset.items()}),
        "by_body_part": _sorted_dict({k: dict(v) for k, v in by_body_part.items()}),
        "by_region": _sorted_dict(Counter(s.region for s in mine)),
        "datasets": sorted({s.dataset for s in mine}),
        "files": len({s.path for s in mine}),
    }


def inputs_accounting(
    files: Sequence[str], samples: Sequence[WrittenSample], rejects: Sequence[Reject]
) -> dict[str, int]:
    """Every input file is written (at least one slice) or rejected (every slice, or as a whole)."""
    written = {s.path for s in samples}
    rejected_paths = {r.path for r in rejects}
    all_files = set(files)
    unaccounted = all_files - written - rejected_paths
    if unaccounted:
        raise RuntimeError(
            f"internal error: {len(unaccounted)} files neither written nor rejected, e.g. "
            f"{sorted(unaccounted)[:3]}"
        )
    return {
        "files": len(all_files),
        "written_files": len(written & all_files),
        "rejected_files": len(all_files - written),
        "partly_rejected_files": len((rejected_paths & written) & all_files),
        "slices_written": len(samples),
        "slices_rejected": sum(1 for r in rejects if r.index is not None),
        "reject_rows": len(rejects),
    }


def read_summary(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / SUMMARY_NAME).read_text(encoding="utf-8"))


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> Path:
    path = Path(out_dir) / SUMMARY_NAME
    write_atomic(path, json.dumps(summary, indent=1, sort_keys=False) + "\n")
    return path


def reason_counts(rejects: Iterable[Reject]) -> dict[str, int]:
    """Rejections per reason (whole files and single slices together), most frequent first."""
    counts = Counter(r.reason for r in rejects)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
