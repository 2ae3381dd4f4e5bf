"""``run_summary.json``: the one file per training run that reports, sweeps and eval read.

Written by global rank 0 at the end of every run, also failed ones (``status: failed`` with the error), so a
sweep table shows crashed jobs instead of silently missing rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_SUMMARY_NAME = "run_summary.json"


def finite_or_none(value: Any) -> float | None:
    """JSON has no NaN: non-finite or non-numeric metric values become null."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def stage_metrics(metrics: Mapping[str, Any], stage: str) -> dict[str, float | None]:
    """``{"acc": 0.9, ...}`` from Lightning's ``{"val/acc": tensor(0.9), ...}`` for one stage prefix."""
    prefix = f"{stage}/"
    return {
        key[len(prefix) :]: finite_or_none(value) for key, value in metrics.items() if key.startswith(prefix)
    }


def write_run_summary(output_dir: str | Path, summary: Mapping[str, Any]) -> Path:
    path = Path(output_dir) / RUN_SUMMARY_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(summary), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_run_summary(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / RUN_SUMMARY_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
