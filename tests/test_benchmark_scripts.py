"""The benchmark scripts still run end to end (tiny sizes, CPU); their figures are not checked here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modality.paths import PROJECT_ROOT

BENCHMARKS = PROJECT_ROOT / "benchmarks"


def run_script(args: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "MODALITY_BENCH_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_gpu_benchmark_dry_run_exercises_every_path(tmp_path: Path) -> None:
    out = run_script([str(BENCHMARKS / "gpu.py"), "--dry-run", "--networks", "resnet18"], tmp_path)
    for mode in ("synthetic", "loader+train", "ddp synthetic", "loader only"):
        assert f"| {mode} |" in out


@pytest.mark.slow
def test_loader_benchmark_prints_its_table(tmp_path: Path) -> None:
    out = run_script(
        [
            str(BENCHMARKS / "loader.py"),
            "--samples",
            "300",
            "--workers",
            "0",
            "--root",
            str(tmp_path / "data"),
        ],
        tmp_path,
    )
    for config in ("datamodule png", "datamodule npy", "stock wds png", "png files", "memory"):
        assert f"| {config} | warm | 0 |" in out
    assert "| datamodule npy | cold | 0 |" in out


def test_prepare_benchmark_prints_both_baselines(tmp_path: Path) -> None:
    from modality.paths import shared_data_root

    if not (shared_data_root() / "manifest.csv").is_file():
        pytest.skip("shared real data not found")
    out = run_script([str(BENCHMARKS / "prepare.py"), "--files", "16", "--repeats", "1"], tmp_path)
    for row in (
        "bare pydicom decode + resize",
        "bare loop, prepare's decoders",
        "prepare -> shards, two passes",
    ):
        assert f"\n{row} " in out
    assert "vs the bare pydicom loop, per slice" in out and "vs the bare loop on prepare's decoders" in out
    assert "speed-up 1 -> 2 workers" in out


def test_partitioned_prepare_benchmark_prints_its_rows_and_projection(tmp_path: Path) -> None:
    from modality.paths import shared_data_root

    if not (shared_data_root() / "manifest.csv").is_file():
        pytest.skip("shared real data not found")
    out = run_script(
        [str(BENCHMARKS / "prepare_parts.py"), "--files", "12", "--copies", "2", "--repeats", "1"], tmp_path
    )
    for row in ("single run", "one part: parts", "one part: merge", "two parts: parts", "two parts: merge"):
        assert f"\n| {row} | " in out
    assert "speed-up, 2 parts side by side vs 1" in out
    assert "| IDC CT/MR/PET | 50.4 M | 23.2 | 128 |" in out
