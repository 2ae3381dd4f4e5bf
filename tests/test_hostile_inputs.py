"""68 hostile inputs mixed with real files, through ``python -m modality.prepare`` and ``eval.py input=``.

The corpus is crafted at test time from real files of ``../shared/data/real`` (tests/hostile_files.py):
files truncated at several offsets, wrong transfer syntax UIDs, no preamble, empty and random files, a
deflated DICOM of 20000 x 20000 (3.5 MB on disk, 800 MB of pixels), an RLE file of a few KB claiming
30000 x 30000, a JPEG 2000 codestream with a bad sector, NaN/Inf rescale, absurd NumberOfFrames, Rows,
SamplesPerPixel and BitsAllocated, PNG/JPEG bombs, truncated images, 16-bit/RGBA/palette/1-bit PNGs, an
empty NIfTI, an object-dtype (pickle) npy, a symlink loop, a FIFO, a name that is not UTF-8... Both commands must finish, crash on none (no "unexpected
error"), account for every input (written or rejected with a reason) and stay under 2 GB: the peak RSS of
the largest process of each run (prepare's main process or a pool worker, eval), from ``getrusage``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
from hostile_files import REJECTED, WRITTEN, real_dicom, run_measured, write_corpus

from modality.paths import shared_data_root
from modality.sources.folders import printable

pytestmark = [
    pytest.mark.skipif(not (shared_data_root() / "manifest.csv").is_file(), reason="real corpus not found"),
    pytest.mark.timeout(300),
]

PEAK_LIMIT_MB = 2048


def eval_command(checkpoint: Path, folder: Path, out: Path, tmp_path: Path, *overrides: str) -> list[str]:
    """``eval.py input=<folder>`` with its outputs and Hydra folder under the test's tmp_path."""
    return [
        sys.executable,
        "eval.py",
        f"ckpt_path={checkpoint}",
        f"input={folder}",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        *overrides,
    ]


def measured(command: list[str]) -> tuple[int, float, str]:
    """(exit code, peak RSS in MB of the largest process of the run: prepare's main process or one of
    its pool workers, or eval; what an OOM killer or a per-process limit sees), stderr tail."""
    result = run_measured(command)
    return result["rc"], result["peak_mb"], result["stderr"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("hostile") / "inputs"
    expected = write_corpus(root)
    assert len(expected) >= 60 and sum(v == WRITTEN for v in expected.values()) >= 10
    on_disk = [
        printable(os.path.relpath(os.path.join(d, f), root)) for d, _, names in os.walk(root) for f in names
    ]
    assert sorted(on_disk) == sorted(expected)
    return root, expected


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 trained for one batch on tiny shards: eval only needs a checkpoint and its preprocessing."""
    import pytorch_lightning as pl
    from tiny_shards import write_tiny_shards

    from modality.data import ModalityDataModule
    from modality.models import ModalityClassifier

    base = tmp_path_factory.mktemp("hostile_ckpt")
    data = write_tiny_shards(base / "shards", {"train": [8], "val": [4], "test": [4]})
    datamodule = ModalityDataModule(str(data), batch_size=4, prepare_dataset=None)
    datamodule.setup("fit")
    model = ModalityClassifier("resnet18", data_info=datamodule.data_info())
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=base,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(base / "tiny.ckpt")
    return base / "tiny.ckpt"


def check_outcomes(outcomes: dict[str, list[str]], written: set[str], expected: dict[str, str]) -> None:
    """Every input written or rejected with a reason, as expected, and none by an unexpected error."""
    assert set(outcomes) | written == set(expected), set(expected) ^ (set(outcomes) | written)
    crashes = {name: reasons for name, reasons in outcomes.items() if any("unexpected" in r for r in reasons)}
    assert not crashes
    assert all(reason.strip() for reasons in outcomes.values() for reason in reasons)
    wrong = {}
    for name, outcome in expected.items():
        if outcome == WRITTEN:
            ok = name in written
        elif outcome == REJECTED:
            ok = name not in written and bool(outcomes.get(name))
        else:
            ok = name not in written and outcome in outcomes.get(name, [])
        if not ok:
            wrong[name] = (outcome, "written" if name in written else outcomes.get(name))
    assert not wrong


def test_prepare_survives_the_hostile_corpus(corpus: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, expected = corpus
    conf = tmp_path / "conf" / "dataset"
    conf.mkdir(parents=True)
    (conf / "hostile.yaml").write_text(
        "\n".join(
            [
                "name: hostile",
                "sources:",
                "  - _target_: modality.sources.folders.DicomFolderSource",
                f"    root: '{root / 'dicom'}'",
                "    dataset: hostile_dicom",
                "  - _target_: modality.sources.folders.ImageFolderSource",
                f"    root: '{root / 'images'}'",
                "    dataset: hostile_images",
                "    label: XR",
                "  - _target_: modality.sources.folders.VolumeSource",
                f"    root: '{root / 'volumes'}'",
                "    dataset: hostile_volumes",
                "    label: CT",
                "split: {hostile_dicom: train, hostile_images: train, hostile_volumes: train}",
                "caps: {}",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "prepared"
    rc, peak, stderr = measured(
        [
            sys.executable,
            "-m",
            "modality.prepare",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "dataset=hostile",
            f"out_dir={out}",
            "image_size=32",
            "workers=2",
            "progress=false",
            "charts=false",
        ]
    )
    assert rc == 0, stderr
    assert peak < PEAK_LIMIT_MB, f"peak RSS {peak:.0f} MB"
    print(f"prepare: peak RSS {peak:.0f} MB")

    summary = json.loads((out / "summary.json").read_text())
    inputs = summary["inputs"]
    assert inputs["files"] == len(expected)
    assert inputs["written_files"] + inputs["rejected_files"] == inputs["files"]

    def name(path: str) -> str:  # paths as the CSVs write them (odd bytes as \\xff)
        return str(Path(path).relative_to(printable(root)))

    outcomes: dict[str, list[str]] = defaultdict(list)
    with (out / "rejects.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            outcomes[name(row["path"])].append(row["reason"])
    written = set()
    for shard in (out / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    written.add(name(json.loads(tar.extractfile(member).read())["source_path"]))
    assert len(written) == inputs["written_files"]
    check_outcomes(outcomes, written, expected)


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_eval_input_survives_the_hostile_corpus(
    corpus: tuple[Path, dict[str, str]], checkpoint: Path, tmp_path: Path
) -> None:
    root, expected = corpus
    out = tmp_path / "eval"
    rc, peak, stderr = measured(eval_command(checkpoint, root, out, tmp_path))
    assert rc == 0, stderr
    assert peak < PEAK_LIMIT_MB, f"peak RSS {peak:.0f} MB"
    print(f"eval input=: peak RSS {peak:.0f} MB")

    def name(path: str) -> str:  # paths as the CSVs write them (odd bytes as \\xff)
        return str(Path(path).relative_to(printable(root)))

    written = {name(row["path"]) for row in read_table(out / "predictions.csv")}
    outcomes: dict[str, list[str]] = defaultdict(list)
    for row in read_table(out / "unreadable.csv"):
        outcomes[name(row["path"])].append(row["reason"])
    check_outcomes(outcomes, written, expected)


def test_eval_config_key_changes_the_budget(checkpoint: Path, tmp_path: Path) -> None:
    """``decode_budget.max_frame_pixels`` on eval.py's command line reaches the readers."""
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(real_dicom("1.2.840.10008.1.2.1").read_bytes())
    out = tmp_path / "eval"
    rc, _, stderr = measured(
        eval_command(checkpoint, folder, out, tmp_path, "decode_budget.max_frame_pixels=1000")
    )
    assert rc == 0, stderr
    assert not read_table(out / "predictions.csv")
    [row] = read_table(out / "unreadable.csv")
    assert row["reason"] == "decoded size over budget" and "max_frame_pixels 1,000" in row["detail"]
