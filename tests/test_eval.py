"""eval.py on the test shards: its numbers match an independent loop, and two DDP ranks count every sample once."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from eval_demo_run import demo_multirun, evaluate_run
from PIL import Image

from modality.evaluation.checkpoint import resolve_checkpoint, run_data_dir
from modality.paths import PROJECT_ROOT


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_multirun(tmp_path_factory.getbasetemp()) / "0"


@pytest.fixture(scope="module")
def single_eval(run_dir: Path) -> tuple[dict[str, Any], Path]:
    return evaluate_run(run_dir), run_dir / "eval"


def _independent_predictions(checkpoint: Path, data_dir: Path) -> dict[str, tuple[int, int]]:
    """key -> (true, predicted) with nothing from modality.evaluation: raw tar reading and hand normalisation."""
    from modality.models import ModalityClassifier

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hparams = dict(state["hyper_parameters"])
    model = ModalityClassifier(**hparams)
    model.load_state_dict(state["state_dict"])
    model.eval()
    info = hparams["data_info"]
    summary = json.loads((data_dir / "summary.json").read_text())
    keys: list[str] = []
    truths: list[int] = []
    images: list[np.ndarray] = []
    for shard in summary["splits"]["test"]["shards"]:
        with tarfile.open(data_dir / "shards" / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
        for name in sorted(n for n in members if n.endswith(".cls")):
            key = name[: -len(".cls")]
            keys.append(key)
            truths.append(int(members[name]))
            images.append(np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])), dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(images))[:, None]
    if x.shape[-1] != info["input_size"]:
        x = torch.nn.functional.interpolate(
            x, size=(info["input_size"],) * 2, mode="bilinear", align_corners=False, antialias=True
        )
    x = x * 2 - 1 if info["normalize"] == "minus_one_one" else (x - info["mean01"]) / info["std01"]
    with torch.no_grad():
        predicted = torch.cat([model(chunk).argmax(dim=1) for chunk in x.split(64)]).tolist()
    results = {key: (truth, int(p)) for key, truth, p in zip(keys, truths, predicted, strict=True)}
    return results


def test_eval_reproduces_an_independent_loop(run_dir: Path, single_eval: tuple[dict[str, Any], Path]) -> None:
    metrics, out = single_eval
    data_dir = Path(run_data_dir(run_dir) or "")
    independent = _independent_predictions(run_dir / "checkpoints" / "best.ckpt", data_dir)
    truths = np.array([t for t, _ in independent.values()])
    predicted = np.array([p for _, p in independent.values()])
    accuracy = float((truths == predicted).mean())
    recalls = [float((predicted[truths == c] == c).mean()) for c in np.unique(truths)]
    assert metrics["samples"] == len(independent)
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert metrics["balanced_accuracy"] == pytest.approx(float(np.mean(recalls)), abs=1e-12)
    # the training loop's own test accuracy (torchmetrics) agrees as well
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["test"]["acc"] == pytest.approx(accuracy, abs=1e-6)

    classes = metrics["classes"]
    rows = (out / "predictions.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:7] == ["key", "shard", "dataset", "body_part", "true", "predicted", "correct"]
    n = len(classes)
    assert header[7 : 7 + n] == [f"prob_{c}" for c in classes]
    # then the simulated-export flag and each head's own probabilities (this model has no value head)
    assert header[7 + n :] == [
        "exported",
        *[f"cnn_prob_{c}" for c in classes],
        *[f"values_prob_{c}" for c in classes],
    ]
    by_key = {r.split(",")[0]: r.split(",") for r in rows[1:]}
    assert set(by_key) == set(independent)
    for key, (true, pred) in independent.items():
        assert by_key[key][4] == classes[true] and by_key[key][5] == classes[pred]
        assert sum(float(p) for p in by_key[key][7 : 7 + n]) == pytest.approx(1.0, abs=1e-4)
        assert by_key[key][7 + n] == "0" and by_key[key][8 + 2 * n :] == [""] * n
        assert sum(float(p) for p in by_key[key][8 + n : 8 + 2 * n]) == pytest.approx(1.0, abs=1e-4)

    counts = np.array(metrics["confusion_matrix"]["counts"])
    assert counts.sum() == len(independent) and np.trace(counts) == int((truths == predicted).sum())
    csv_rows = (out / "confusion_matrix.csv").read_text().splitlines()
    assert csv_rows[0] == "true\\predicted," + ",".join(classes)
    assert (out / "confusion_matrix.png").stat().st_size > 5000
    assert sum(row["count"] for row in metrics["per_dataset"].values()) == len(independent)
    assert sum(row["count"] for row in metrics["per_body_part"].values()) == len(independent)
    assert metrics["ece"]["n_bins"] == 15 and 0.0 <= metrics["ece"]["value"] <= 1.0
    timing = metrics["timing"]
    assert set(timing["batches"]) == {"1", "8"}
    assert timing["batches"]["8"]["ms_per_image"] > 0 and timing["hardware"]["cpu_model"]
    assert metrics["count_check"]["ok"] and metrics["preprocess_differs_from_checkpoint"] == []


def test_eval_with_two_ddp_processes_counts_each_sample_once(
    run_dir: Path, single_eval: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "eval.py",
        f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
        f"data_dir={run_data_dir(run_dir)}",
        f"out={out}",
        "trainer=ddp_cpu",
        "batch_size=16",
        "timing.enabled=false",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    summary = json.loads((Path(str(run_data_dir(run_dir))) / "summary.json").read_text())
    expected = summary["splits"]["test"]["samples"]
    check = metrics["count_check"]
    assert metrics["world_size"] == 2
    assert check == {**check, "expected": expected, "counted": expected, "distinct": expected, "ok": True}
    assert sorted(check["per_rank"]) == [expected // 2, expected - expected // 2]
    single, _ = single_eval
    assert metrics["accuracy"] == single["accuracy"]
    assert metrics["confusion_matrix"]["counts"] == single["confusion_matrix"]["counts"]


def test_run_folder_resolution_and_clear_errors(run_dir: Path, tmp_path: Path) -> None:
    source = resolve_checkpoint(run_dir)
    assert source.checkpoint == run_dir / "checkpoints" / "best.ckpt" and source.run_dir == run_dir
    assert resolve_checkpoint(source.checkpoint).run_dir == run_dir
    assert (Path(str(run_data_dir(run_dir))) / "summary.json").is_file()
    with pytest.raises(FileNotFoundError, match=r"no checkpoints/best\.ckpt"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint or run folder"):
        resolve_checkpoint(tmp_path / "missing.ckpt")


class _NotAWeight:
    """Stands for anything a tampered checkpoint could smuggle into the pickle stream."""


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    from modality.evaluation.checkpoint import load_classifier

    path = tmp_path / "tampered.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"payload": _NotAWeight()}}, path)
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported global"):
        load_classifier(path)


def test_preprocess_differences_compare_the_typed_preprocessing() -> None:
    """Stored forms that mean the same preprocessing are no difference (ints vs floats, window order, keys
    left at their defaults, keys the contract does not own); a real change is named by its key."""
    from modality.evaluation.checkpoint import preprocess_differences

    trained = {
        "image_size": 64,
        "aspect": "pad",
        "scaling": {"method": "window", "windows": {"CT": [40, 400], "MR": [300, 600]}, "low": 0.5},
        "colour": "grey",
        "class_map": {"classes": ["CT"]},
    }
    same = {
        "image_size": 64,
        "scaling": {"method": "window", "windows": {"MR": [300.0, 600.0], "CT": [40.0, 400.0]}, "low": 0.5},
    }
    assert preprocess_differences(trained, same) == []
    assert preprocess_differences(trained, {**same, "image_size": 224, "aspect": "crop"}) == [
        "image_size",
        "aspect",
    ]
    assert preprocess_differences(trained, {**same, "scaling": {"method": "percentile"}}) == ["scaling"]
