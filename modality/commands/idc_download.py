"""``python -m modality.commands.idc_download plan=<plan dir> out=<dir> [dry_run=true] [endpoint_url=URL]`` (Hydra app).

Fetches the series a plan keeps from IDC's public buckets with s5cmd into
``<out>/<collection>/<PatientID>/<SeriesInstanceUID>/*.dcm``; reruns skip complete series. ``dry_run=true``
prints the size still to fetch and writes the s5cmd run file only. Exits with status 1 when series stay
incomplete (rerun to resume). The work is in :mod:`modality.sources.idc.download`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from modality.paths import CONFIG_DIR
from modality.sources.idc.download import download_plan, read_series_manifest


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="idc_download")
def main(cfg: DictConfig) -> None:
    manifest = read_series_manifest(cfg.plan)
    report = download_plan(
        manifest,
        cfg.out,
        dry_run=bool(cfg.dry_run),
        endpoint_url=cfg.get("endpoint_url"),
        workers=int(cfg.workers),
        s5cmd=cfg.get("s5cmd"),
        splits=list(cfg.splits) if cfg.get("splits") is not None else None,
        sample_instances=bool(cfg.get("sample_instances", False)),
    )
    pending = report.planned - report.already_complete
    print(
        f"{report.planned} planned series: {report.already_complete} already complete, {pending} to fetch "
        f"({report.size_mb / 1024:.2f} GB); s5cmd run file: {report.manifest_path}"
    )
    if cfg.dry_run:
        return
    print(f"fetched {report.fetched} series; {len(report.incomplete)} incomplete")
    if report.incomplete:
        print(f"s5cmd exit {report.s5cmd_returncode}; stderr tail:\n{report.s5cmd_stderr}", file=sys.stderr)
        print(f"incomplete series (rerun to resume): {report.incomplete[:10]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
