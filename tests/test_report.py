"""The report over a two-job multirun folder writes the runs table, every figure and a self-contained page."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modality.paths import CONFIG_DIR
from modality.reports import cli as report_cli
from modality.reports.report import build_report, find_runs

CLASSES = ["CT", "MR", "PT", "XR"]


def _write_run(run_dir: Path, model: str, weight_decay: float, data_dir: Path, with_eval: bool) -> None:
    """Stand-in run folder following the run-directory contract (train.py's real output is tested elsewhere)."""
    (run_dir / "csv" / "version_0").mkdir(parents=True)
    summary = {
        "model": model,
        "dropout": 0.5,
        "weight_decay": weight_decay,
        "lr": 1e-3,
        "epochs": 3,
        "batch_size": 8,
        "image_size": 32,
        "data_dir": str(data_dir),
        "best_ckpt": str(run_dir / "checkpoints" / "best.ckpt"),
        "last_ckpt": str(run_dir / "checkpoints" / "last.ckpt"),
        "val": {"acc": 0.6, "balanced_acc": 0.55},
        "test": None if with_eval else {"acc": 0.4, "balanced_acc": 0.35},
        "train_time_s": 12.5,
        "images_per_s": 100.0,
        "status": "ok",
        "error": None,
    }
    (run_dir / "run_summary.json").write_text(json.dumps(summary))
    lines = ["epoch,step,train/loss,train/acc,val/acc,val/balanced_acc"]
    for epoch in range(3):
        lines.append(f"{epoch},{epoch * 10 + 5},1.0,,,")
        lines.append(f"{epoch},{epoch * 10 + 9},,{0.5 + 0.1 * epoch},,")
        lines.append(f"{epoch},{epoch * 10 + 9},,,{0.4 + 0.1 * epoch},0.4")
    (run_dir / "csv" / "version_0" / "metrics.csv").write_text("\n".join(lines) + "\n")
    if with_eval:
        (run_dir / "eval").mkdir()
        metrics = {
            "classes": CLASSES,
            "accuracy": 0.7,
            "balanced_accuracy": 0.65,
            "confusion_matrix": {
                "classes": CLASSES,
                "counts": [[5, 1, 0, 0], [2, 4, 0, 0], [0, 0, 3, 0], [0, 0, 1, 2]],
            },
            "timing": {"batches": {"1": {"ms_per_image": 3.2}, "128": {"ms_per_image": 0.8}}},
        }
        (run_dir / "eval" / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture()
def multirun(tmp_path: Path) -> Path:
    data_dir = tmp_path / "prepared"
    data_dir.mkdir()
    splits = {
        split: {"samples": n, "by_class": {"CT": n, "MR": n // 2, "PT": 3, "XR": 2}}
        for split, n in (("train", 40), ("val", 10), ("test", 12))
    }
    (data_dir / "summary.json").write_text(json.dumps({"classes": CLASSES, "splits": splits}))
    sweep = tmp_path / "multirun" / "2026-01-01" / "10-00-00"
    _write_run(sweep / "0", "resnet18", 0.0, data_dir, with_eval=True)
    _write_run(sweep / "1", "resnet18", 0.01, data_dir, with_eval=False)
    (sweep / "multirun.yaml").write_text("{}\n")
    return tmp_path / "multirun"


def test_report_on_two_job_multirun_draws_every_figure(multirun: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    made = build_report([multirun], out)
    assert made["runs"] == 2
    assert made["skipped"] == {}
    expected = {
        "images_per_class_per_split",
        "accuracy_per_model",
        "balanced_accuracy_per_model",
        "accuracy_per_epoch",
        "accuracy_against_l2",
        "confusion_matrices",
        "training_time_per_model",
    }
    assert set(made["figures"]) == expected
    for path in made["figures"].values():
        assert path.stat().st_size > 5_000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = made["table"]
    assert table["weight_decay"].tolist() == [0.0, 0.01]
    # eval/metrics.json wins over run_summary test numbers; run 1 falls back to run_summary
    assert table["test_acc"].tolist() == [0.7, 0.4]
    assert table["ms_per_image_b1"].tolist()[0] == 3.2
    markdown = (out / "runs.md").read_text()
    assert markdown.count("\n") == 4 and "resnet18 d=0.5 L2=0.01" in markdown
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(expected)
    assert 'src="http' not in page and "<link" not in page


def _report_command(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "modality.reports", *overrides, f"paths.log_dir={tmp_path / 'logs'}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_report_command_runs_and_rejects_empty(multirun: Path, tmp_path: Path) -> None:
    """The Hydra app as a user runs it: one folder bare, several as a list; exit 2 when no run is found."""
    done = _report_command(tmp_path, f"runs={multirun}", f"out={tmp_path / 'r'}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "r" / "runs.csv").read_text().startswith("run,label,model,dropout,weight_decay")
    jobs = multirun / "2026-01-01" / "10-00-00"
    done = _report_command(tmp_path, f"runs=[{jobs / '0'},{jobs / '1'}]", f"out={tmp_path / 'two'}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len((tmp_path / "two" / "runs.csv").read_text().splitlines()) == 3
    assert report_cli.write_report([tmp_path / "nothing-here"]) == 2


def test_config_keys_are_the_report_options() -> None:
    """configs/reports.yaml holds every option of write_report, with the same default."""
    import inspect

    from omegaconf import OmegaConf

    config = OmegaConf.load(CONFIG_DIR / "reports.yaml")
    parameters = inspect.signature(report_cli.write_report).parameters
    assert set(parameters) == {"runs", "out"}
    assert OmegaConf.is_missing(config, "runs")
    assert config.out is parameters["out"].default is None


def test_runs_have_a_folder_column_and_one_spelling_per_hyperparameter(tmp_path: Path) -> None:
    """``weight_decay=0`` from a Hydra override is the int 0, ``0.0`` from an experiment's YAML a float:
    the labels once read "L2=0" and "L2=0.0" for the same value, and the table had no run-folder column."""
    data_dir = tmp_path / "prepared"
    sweep = tmp_path / "multirun"
    _write_run(sweep / "0", "resnet18", 0, data_dir, with_eval=False)  # int, as Hydra parses "0"
    _write_run(sweep / "1", "resnet18", 0.01, data_dir, with_eval=False)
    _write_run(sweep / "2", "resnet18", 0.0, data_dir, with_eval=False)
    _write_run(sweep / "10", "mnasnet", 0.0, data_dir, with_eval=False)
    table = build_report([sweep], tmp_path / "report")["table"]
    assert list(table.columns[:3]) == ["run", "label", "model"]
    assert table["run"].tolist() == ["0", "1", "2", "10"]
    assert table["label"].tolist() == [
        "resnet18 d=0.5 L2=0 [0]",  # same recipe as run 2: told apart by the folder
        "resnet18 d=0.5 L2=0.01",
        "resnet18 d=0.5 L2=0 [2]",
        "mnasnet",
    ]
    markdown = (tmp_path / "report" / "runs.md").read_text()
    assert "L2=0.0 " not in markdown and "| 10 | mnasnet | mnasnet |" in markdown


def test_a_single_run_is_named_by_its_folder(multirun: Path, tmp_path: Path) -> None:
    job = multirun / "2026-01-01" / "10-00-00" / "1"
    table = build_report([job], tmp_path / "report")["table"]
    assert table[["run", "label"]].values.tolist() == [["1", "resnet18"]]


def test_find_runs_orders_jobs_naturally(tmp_path: Path) -> None:
    for job in ("0", "2", "10"):
        (tmp_path / job).mkdir()
        (tmp_path / job / "run_summary.json").write_text("{}")
    assert [p.name for p in find_runs([tmp_path])] == ["0", "2", "10"]


def test_report_page_renders_in_headless_chromium(multirun: Path, tmp_path: Path) -> None:
    """The page must show its figures from the file alone; skipped where no chromium is installed."""
    import numpy as np
    from PIL import Image

    from modality.reports.screenshot import find_browser, screenshot

    if find_browser() is None:
        pytest.skip("chromium not installed")
    made = build_report([multirun], tmp_path / "report")
    shot = screenshot(made["html"], tmp_path / "shot.png", size="1400,2400")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    # bar charts and heatmaps put strongly coloured pixels on the page, not just black text on white
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 80
    assert saturated.mean() > 0.01


def test_report_on_a_real_two_job_multirun(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """train.py -m (weight_decay 0, 0.01) on the demo, eval.py on job 0, then every figure from real files."""
    from eval_demo_run import demo_multirun, evaluate_run

    sweep = demo_multirun(tmp_path_factory.getbasetemp())
    evaluate_run(sweep / "0")
    assert (sweep / "0" / "eval" / "metrics.json").is_file()

    made = build_report([sweep], tmp_path / "report")
    assert made["skipped"] == {}
    assert len(made["figures"]) == 7
    table = made["table"]
    assert table["weight_decay"].tolist() == [0.0, 0.01]
    assert table["epochs"].tolist() == [2, 2]
    assert table[["val_acc", "test_acc", "train_time_s", "ms_per_image_b1"]].iloc[0].notna().all()
    assert table["ms_per_image_b128"].isna().all()  # timing ran at batch 1 and 8 only


def test_the_runs_table_has_the_body_part_heads_balanced_accuracy_where_a_run_has_it() -> None:
    from modality.reports.report import RunRecord, runs_table

    with_head = RunRecord(
        path=Path("a"),
        label="a",
        name="a",
        summary={"val": {"acc": 0.9, "region_balanced_acc": 0.8}, "status": "ok"},
        evaluation={"accuracy": 0.85, "region": {"balanced_accuracy": 0.7}},
        epochs=None,
    )
    without = RunRecord(
        path=Path("b"), label="b", name="b", summary={"val": {"acc": 0.9}}, evaluation=None, epochs=None
    )
    table = runs_table([with_head, without])
    assert table["val_region_balanced_acc"].tolist()[0] == 0.8
    assert table["test_region_balanced_acc"].tolist()[0] == 0.7
    assert table[["val_region_balanced_acc", "test_region_balanced_acc"]].iloc[1].isna().all()
