"""``python -m modality.reports runs=<run or multirun dir> [out=DIR]`` (Hydra app, configs/reports.yaml): the
runs table, figures and HTML page. Several folders: ``runs=[<dir>,<dir>]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from modality.paths import CONFIG_DIR


def write_report(runs: Sequence[Path], out: Path | None = None) -> int:
    """The report over ``runs`` into ``out`` (default ``<first dir>/report``), printed; the exit status
    (0 written, 2 no run found)."""
    from modality.reports.report import build_report

    out_dir = out if out is not None else runs[0] / "report"
    try:
        made = build_report(runs, out_dir)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    print(made["table"].to_string(index=False))
    for name, path in made["figures"].items():
        print(f"figure {name}: {path}")
    for name, reason in made["skipped"].items():
        print(f"not drawn {name}: {reason}")
    print(f"HTML page: {made['html']}")
    return 0


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="reports")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "runs"):
        print("say which runs to report: runs=<run or multirun dir> or runs=[<dir>,<dir>]", file=sys.stderr)
        sys.exit(2)
    # one folder may be given bare (runs=<dir>), several as a list (runs=[<dir>,<dir>])
    runs = [Path(p) for p in cfg.runs] if isinstance(cfg.runs, ListConfig) else [Path(cfg.runs)]
    sys.exit(write_report(runs, None if cfg.out is None else Path(cfg.out)))
