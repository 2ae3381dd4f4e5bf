"""Cross-validation with a body-part head: region figures per fold, per region and pooled beside the modality ones.

Same pattern as test_crossval.py: a pool written in the documented shard format and a stand-in runner that
"predicts" from the stored pixels (class) and from the recorded region (with planted mistakes), plus one fold
read back through eval.py's predictions.csv columns.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modality import crossval
from modality.crossval import FoldPredictions
from modality.shards.reader import read_shard_samples, stored_image

CLASSES = ["CT", "MR", "PT", "XR"]
REGIONS = ["head_neck", "chest", "abdomen_pelvis"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """Three sources (one group each): site_a CT head/chest, site_b MR head + unknown, site_c CT chest/abdomen."""
    rows = [
        ("site_a", "CT", "head_neck"),
        ("site_a", "CT", "head_neck"),
        ("site_a", "CT", "chest"),
        ("site_a", "MR", "chest"),
        ("site_b", "MR", "head_neck"),
        ("site_b", "MR", "head_neck"),
        ("site_b", "MR", "unknown"),
        ("site_c", "CT", "chest"),
        ("site_c", "CT", "abdomen_pelvis"),
        ("site_c", "MR", "head_neck"),
    ]
    root = tmp_path / "pool"
    (root / "shards").mkdir(parents=True)
    with tarfile.open(root / "shards" / "train-000000.tar", "w") as tar:
        for i, (dataset, cls, region) in enumerate(rows):
            key = f"tr{i:018x}"
            meta = {"dataset": dataset, "class": cls, "patient_id": f"{dataset}-{i}", "region": region}
            _add(tar, f"{key}.png", _png(10 if cls == "CT" else 70))
            _add(tar, f"{key}.cls", str(CLASSES.index(cls)).encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    summary = {
        "classes": CLASSES,
        "regions": REGIONS,
        "image_size": 8,
        "preprocess": {
            "image_size": 8,
            "aspect": "pad",
            "scaling": {"method": "percentile"},
            "colour": "grey",
        },
        "splits": {
            "train": {"samples": len(rows), "shards": [{"name": "train-000000.tar", "samples": len(rows)}]}
        },
    }
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def _stand_in(fold_dir: Path) -> FoldPredictions:
    """Class from the pixel value; region from the record, except site_c's chest, which it calls head_neck."""
    out = FoldPredictions([], [], [])
    for shard in sorted((fold_dir / "shards").glob("test-*.tar")):
        for _key, members in read_shard_samples(shard):
            meta = json.loads(members["json"])
            out.true.append(meta["class"])
            out.predicted.append("CT" if int(stored_image(members)[0, 0]) < 50 else "MR")
            out.datasets.append(meta["dataset"])
            out.regions_true.append(meta["region"])
            wrong = meta["dataset"] == "site_c" and meta["region"] == "chest"
            guess = "head_neck" if wrong or meta["region"] == "unknown" else meta["region"]
            out.regions_predicted.append(guess)
    return out


def test_crossval_reports_region_figures_per_fold_region_and_pooled(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    summary = crossval.run_crossval(pool, out, _stand_in, scheme="logo")
    region = summary["region"]
    assert region["classes"] == REGIONS
    by_fold = {tuple(f["held_out_groups"]): f for f in region["folds"]}
    # site_a: 4 known regions, all right; site_b: the unknown one is counted apart, not scored
    assert by_fold[("site_a",)]["acc"] == 1.0 and by_fold[("site_a",)]["samples"] == 4
    assert by_fold[("site_b",)]["samples"] == 2 and region["unknown"] == 1
    # site_c: abdomen_pelvis is held out with the only source that has it -> untrainable, not an error;
    # its chest image is called head_neck -> 1 of 2 scored images right
    site_c = by_fold[("site_c",)]
    assert site_c["untrainable"] == {"abdomen_pelvis": 1}
    assert site_c["samples"] == 2 and site_c["acc"] == 0.5 and site_c["recall"]["chest"] == 0.0
    assert region["untrainable"] == {"abdomen_pelvis": 1}
    assert region["pooled"]["samples"] == 8
    assert region["pooled"]["recall"]["chest"] == pytest.approx(2 / 3)
    assert region["pooled"]["recall"]["head_neck"] == 1.0
    assert region["acc"]["n"] == 3
    text = (out / "crossval.md").read_text()
    assert "Body-part head" in text and "recall chest" in text and "modality balanced acc" in text
    assert json.loads((out / "crossval.json").read_text())["region"]["pooled"]["samples"] == 8
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"region", "region_predicted"} <= set(rows[0]) and len(rows) == 10


def test_fold_predictions_read_eval_region_columns(tmp_path: Path) -> None:
    path = tmp_path / "predictions.csv"
    columns = [
        "key",
        "dataset",
        "true",
        "predicted",
        "cnn_prob_CT",
        "region",
        "region_predicted",
        "region_correct",
    ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerow(["k1", "site_a", "CT", "CT", "0.9", "chest", "chest", "1"])
        writer.writerow(["k2", "site_a", "CT", "MR", "0.2", "unknown", "head_neck", ""])
    got = crossval.read_predictions(path)
    assert got.regions_true == ["chest", "unknown"] and got.regions_predicted == ["chest", "head_neck"]
    plain = tmp_path / "plain.csv"
    plain.write_text("key,dataset,true,predicted\nk1,site_a,CT,CT\n")
    assert crossval.read_predictions(plain).regions_predicted == []


def test_no_region_block_without_a_body_part_head(pool: Path, tmp_path: Path) -> None:
    def modality_only(fold_dir: Path) -> FoldPredictions:
        got = _stand_in(fold_dir)
        return FoldPredictions(got.true, got.predicted, got.datasets)

    summary = crossval.run_crossval(pool, tmp_path / "cv", modality_only, scheme="logo")
    assert "region" not in summary
    assert "Body-part head" not in (tmp_path / "cv" / "crossval.md").read_text()
