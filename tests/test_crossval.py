"""Cross-validation over sources: grouping, fold planning, fold shards and the summary, on tiny hand-built pools.

The pool here is written directly in the documented shard format (docs/design.md) so these tests need neither
the decoders nor a trained model; the fold runner is a stand-in that "predicts" from the stored pixels.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modality import crossval
from modality.crossval import FoldResult
from modality.shards.reader import read_shard_samples, stored_image

CLASSES = ["CT", "MR", "PT", "XR"]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_pool(root: Path, samples: list[dict]) -> Path:
    """Write a prepared pool: every sample has dataset, class, patient_id, value (its constant pixel value)."""
    (root / "shards").mkdir(parents=True)
    by_split: dict[str, list[dict]] = {}
    for sample in samples:
        by_split.setdefault(sample.get("split", "train"), []).append(sample)
    splits = {}
    for split, members in by_split.items():
        name = f"{split}-000000.tar"
        with tarfile.open(root / "shards" / name, "w") as tar:
            for i, sample in enumerate(members):
                key = f"{split[:2]}{i:018x}"
                pixels = np.full((8, 8), sample["value"], dtype=np.uint8)
                meta = {
                    "dataset": sample["dataset"],
                    "class": sample["class"],
                    "patient_id": sample["patient_id"],
                    "pixel_hash": sample.get("sha1", f"{sample['dataset']}-{i}"),
                    "body_part": "chest",
                }
                _add(tar, f"{key}.png", _png(pixels))
                _add(tar, f"{key}.cls", str(CLASSES.index(sample["class"])).encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        splits[split] = {"samples": len(members), "shards": [{"name": name, "samples": len(members)}]}
    summary = {
        "classes": CLASSES,
        "image_size": 8,
        "image_format": "png",
        "preprocess": {
            "image_size": 8,
            "aspect": "pad",
            "scaling": {"method": "percentile"},
            "colour": "grey",
        },
        "seed": 0,
        "splits": splits,
        "stats": {"train": {"mean": 0.0, "std": 0.0}},
    }
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def _sample(dataset: str, cls: str, patient: str, value: int, **extra) -> dict:
    return {"dataset": dataset, "class": cls, "patient_id": patient, "value": value, **extra}


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """Five sources; site_b shares a patient with site_a, site_d an identical image with site_c."""
    samples = []
    for i in range(6):
        samples.append(_sample("site_a", "CT", f"a{i % 3}", 10 + i, split="train"))
        samples.append(_sample("site_a", "MR", f"a{i % 3}", 60 + i, split="train"))
    samples.append(_sample("site_b", "CT", "a0", 20, split="val"))  # same patient as site_a
    samples.append(_sample("site_b", "PT", "b1", 130, split="val"))
    for i in range(4):
        samples.append(_sample("site_c", "XR", f"c{i}", 200 + i, split="test"))
    samples.append(_sample("site_d", "XR", "d0", 210, sha1="site_c-0", split="test"))  # identical pixels
    samples.append(_sample("site_d", "MR", "d1", 70, split="test"))
    for i in range(3):
        samples.append(_sample("site_e", "MR", "0", 75 + i, split="train"))  # placeholder id "0"
    samples.append(_sample("site_f", "PT", "0", 140, split="val"))
    return make_pool(tmp_path / "pool", samples)


def test_sources_sharing_a_patient_or_an_image_form_one_group(pool: Path) -> None:
    groups = crossval.group_sources(crossval.index_samples(pool))
    assert groups["site_a"] == groups["site_b"] == "site_a (+1 linked)"
    assert groups["site_c"] == groups["site_d"] == "site_c (+1 linked)"
    # "0" is an anonymiser placeholder, not a person: it must not fuse unrelated sources
    assert groups["site_e"] == "site_e"
    assert groups["site_f"] == "site_f"


def test_leave_one_group_out_holds_out_every_group_once() -> None:
    folds = crossval.plan_folds({"g1": 5, "g2": 3, "g3": 1}, scheme="logo")
    assert folds == [["g1"], ["g2"], ["g3"]]


def test_group_kfold_balances_fold_sizes_and_is_deterministic() -> None:
    sizes = {f"g{i}": size for i, size in enumerate([50, 40, 30, 20, 10, 10, 5, 5])}
    folds = crossval.plan_folds(sizes, scheme="group_kfold", k=3, seed=1)
    assert sorted(g for fold in folds for g in fold) == sorted(sizes)
    loads = [sum(sizes[g] for g in fold) for fold in folds]
    assert max(loads) - min(loads) <= 10
    assert folds == crossval.plan_folds(sizes, scheme="group_kfold", k=3, seed=1)


@pytest.mark.parametrize(
    ("scheme", "k", "message"),
    [
        ("group_kfold", 4, "only 3 source groups"),
        ("group_kfold", 1, "k >= 2"),
        ("random", 2, "unknown crossval"),
    ],
)
def test_impossible_plans_raise_clear_errors(scheme: str, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        crossval.plan_folds({"g1": 1, "g2": 1, "g3": 1}, scheme=scheme, k=k)


def test_fold_shards_hold_out_whole_groups_with_exact_train_statistics(pool: Path, tmp_path: Path) -> None:
    samples = crossval.index_samples(pool)
    plans = crossval.build_fold_plans(samples, scheme="logo", k=0, seed=0)
    plan = next(p for p in plans if p.held_out_groups == ["site_a (+1 linked)"])
    fold_dir = tmp_path / "fold"
    summary = crossval.write_fold_shards(pool, fold_dir, plan, shard_max_samples=5)

    seen: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    train_pixels = []
    for shard in sorted((fold_dir / "shards").glob("*.tar")):
        split = shard.name.split("-")[0]
        for _key, members in read_shard_samples(shard):
            seen[split].add(json.loads(members["json"])["dataset"])
            if split == "train":
                train_pixels.append(stored_image(members))
    assert seen["test"] == seen["val"] == {"site_a", "site_b"}
    assert seen["train"] == {"site_c", "site_d", "site_e", "site_f"}
    assert not list((fold_dir / "shards").glob("*.partial"))
    assert summary["splits"]["test"]["samples"] == 14
    assert summary["splits"]["train"]["samples"] == 10
    # shards capped at 5 samples each, with per-shard counts that add up
    assert [s["samples"] for s in summary["splits"]["train"]["shards"]] == [5, 5]
    pixels = np.stack(train_pixels).astype(np.float64)
    assert summary["stats"]["train"]["mean"] == pytest.approx(pixels.mean())
    assert summary["stats"]["train"]["std"] == pytest.approx(pixels.std())
    assert summary["preprocess"]["scaling"] == {"method": "percentile"}
    assert json.loads((fold_dir / "summary.json").read_text())["crossval"]["held_out_groups"] == [
        "site_a (+1 linked)"
    ]


def test_an_inner_validation_split_comes_from_the_training_groups_only(pool: Path, tmp_path: Path) -> None:
    """inner_val: the checkpoint is chosen on training groups held back, never on the held-out ones."""
    samples = crossval.index_samples(pool)
    plans = crossval.build_fold_plans(samples, scheme="logo", k=0, seed=0, inner_val=2)
    for plan in plans:
        assert plan.val_datasets
        held, val, train = set(plan.held_out_datasets), set(plan.val_datasets), set(plan.train_datasets)
        assert not (held & val) and not (held & train) and not (val & train)
        assert held | val | train == {"site_a", "site_b", "site_c", "site_d", "site_e", "site_f"}
    assert all(not p.val_datasets for p in crossval.build_fold_plans(samples, scheme="logo", k=0, seed=0))
    plan = next(p for p in plans if p.held_out_groups == ["site_a (+1 linked)"])
    fold_dir = tmp_path / "fold"
    summary = crossval.write_fold_shards(pool, fold_dir, plan)
    seen: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for shard in sorted((fold_dir / "shards").glob("*.tar")):
        for _key, members in read_shard_samples(shard):
            seen[shard.name.split("-")[0]].add(json.loads(members["json"])["dataset"])
    assert seen["test"] == {"site_a", "site_b"}
    assert seen["val"] == set(plan.val_datasets) and not seen["val"] & seen["test"]
    assert seen["train"] == set(plan.train_datasets)
    assert summary["crossval"]["val_datasets"] == plan.val_datasets


def test_fold_shards_are_readable_by_webdataset(pool: Path, tmp_path: Path) -> None:
    webdataset = pytest.importorskip("webdataset")
    plan = crossval.build_fold_plans(crossval.index_samples(pool), scheme="logo", k=0, seed=0)[0]
    summary = crossval.write_fold_shards(pool, tmp_path / "fold", plan)
    urls = [str(tmp_path / "fold" / "shards" / s["name"]) for s in summary["splits"]["train"]["shards"]]
    decoded = list(webdataset.WebDataset(urls, shardshuffle=False).decode("l"))
    assert len(decoded) == summary["splits"]["train"]["samples"]
    assert decoded[0]["png"].shape == (8, 8)


def _predict_from_pixels(fold_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """Stand-in for train + eval: classify the held-out samples by their pixel value band."""
    true, predicted, datasets = [], [], []
    for shard in sorted((fold_dir / "shards").glob("test-*.tar")):
        for _key, members in read_shard_samples(shard):
            meta = json.loads(members["json"])
            value = int(stored_image(members)[0, 0])
            guess = "CT" if value < 50 else "MR" if value < 100 else "PT" if value < 180 else "XR"
            if meta["dataset"] == "site_d" and meta["class"] == "MR":
                guess = "CT"  # one deliberate mistake
            true.append(meta["class"])
            predicted.append(guess)
            datasets.append(meta["dataset"])
    return true, predicted, datasets


def test_crossval_summary_counts_every_held_out_image_once(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    summary = crossval.run_crossval(pool, out, _predict_from_pixels, scheme="logo")
    assert (out / "crossval.md").exists() and (out / "plan.json").exists()
    by_group = {tuple(f["held_out_groups"]): f for f in summary["folds"]}
    # site_c+site_d holds the only XR: no fold can learn XR there, so those 5 images are "untrainable"
    cd = by_group[("site_c (+1 linked)",)]
    assert cd["untrainable"] == {"XR": 5}
    assert cd["samples"] == 1 and cd["acc"] == 0.0
    ab = by_group[("site_a (+1 linked)",)]
    assert ab["untrainable"] == {"CT": 7}  # every CT is in site_a+site_b
    assert ab["acc"] == 1.0 and ab["recall"] == {"MR": 1.0, "PT": 1.0}
    assert summary["pooled"]["samples"] + sum(summary["untrainable"].values()) == 24
    assert summary["pooled"]["confusion"]["MR"]["CT"] == 1
    accs = [f["acc"] for f in summary["folds"]]
    assert summary["acc"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["acc"]["std"] == pytest.approx(np.std(accs, ddof=1))


def test_a_failing_fold_is_recorded_and_the_others_still_run(pool: Path, tmp_path: Path) -> None:
    def flaky(fold_dir: Path) -> tuple[list[str], list[str], list[str]]:
        if "site_e" in json.loads((fold_dir / "summary.json").read_text())["crossval"]["held_out_groups"]:
            raise RuntimeError("out of memory")
        return _predict_from_pixels(fold_dir)

    summary = crossval.run_crossval(pool, tmp_path / "cv", flaky, scheme="logo")
    failed = [f for f in summary["folds"] if f["status"] == "failed"]
    assert [f["held_out_groups"] for f in failed] == [["site_e"]]
    assert "out of memory" in failed[0]["error"]
    assert summary["acc"]["n"] == 3  # site_a+site_b, site_c+site_d (1 trainable image), site_f
    assert "FAILED" in (tmp_path / "cv" / "crossval.md").read_text()


def test_fold_metrics_leave_out_classes_the_fold_never_trained_on() -> None:
    result = FoldResult(
        index=0,
        held_out_groups=["g"],
        true=["CT", "CT", "PT", "MR"],
        predicted=["CT", "MR", "CT", "MR"],
        datasets=["g"] * 4,
        train_classes=["CT", "MR", "XR"],
    )
    metrics = crossval.fold_metrics(result, CLASSES)
    assert metrics["untrainable"] == {"PT": 1}
    assert metrics["recall"] == {"CT": 0.5, "MR": 1.0}
    assert metrics["balanced_acc"] == pytest.approx(0.75)
    assert metrics["acc"] == pytest.approx(2 / 3)


def test_crossval_config_composes_with_a_pool_and_quoted_train_overrides() -> None:
    from hydra import compose, initialize_config_dir

    from modality.paths import CONFIG_DIR

    overrides = [
        "pool=real_shared",
        "scheme=logo",
        'train_overrides=["experiment=real_shared","trainer.max_epochs=2"]',
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("crossval", overrides=overrides)
    assert cfg.prepared_dir.endswith("real_shared/prepared")
    assert cfg.out_dir.endswith("outputs/crossval/real_shared")
    assert list(cfg.train_overrides) == ["experiment=real_shared", "trainer.max_epochs=2"]


def _with_probabilities(fold_dir: Path) -> crossval.FoldPredictions:
    """The pixel stand-in plus head probabilities: a CNN that is 90% sure of its guess and a value head that
    knows the truth, abstaining on every third image."""
    true, predicted, datasets = _predict_from_pixels(fold_dir)
    cnn = [[0.9 if c == p else 0.1 / 3 for c in CLASSES] for p in predicted]
    values = [None if i % 3 == 0 else [0.97 if c == t else 0.01 for c in CLASSES] for i, t in enumerate(true)]
    exports = [t if i % 2 == 0 else None for i, t in enumerate(true)]  # exports always right, on even rows
    return crossval.FoldPredictions(true, predicted, datasets, cnn, values, exports)


def test_nested_decisions_never_use_the_held_out_fold(pool: Path, tmp_path: Path) -> None:
    summary = crossval.run_crossval(pool, tmp_path / "cv", _with_probabilities, scheme="logo")
    assert set(summary["decisions"]) == {"cnn", "values", "fused"}
    assert (tmp_path / "cv" / "calibration.json").is_file()
    stored = json.loads((tmp_path / "cv" / "calibration.json").read_text())
    assert stored["unknown_below_slice"] == summary["confidence"]["final_thresholds"]["slice"]
    assert stored["unknown_target_accuracy"] == 0.95
    nested = summary["nested_calibrations"]
    for index, fitted in nested.items():
        assert int(index) not in fitted["fitted_on"]["folds"]
    # the value head knows the truth where it answers: fusing it must not lose to the CNN alone
    decided = summary["decisions"]
    assert decided["fused"]["pooled"]["acc"] >= decided["cnn"]["pooled"]["acc"]
    assert decided["values"]["pooled"]["acc"] == 1.0
    # the toy sources hold under MIN_SOURCE_SAMPLES images each: listed, but none is named the worst
    assert summary["per_source"] and summary["worst_source"] is None
    sized = {d: m for d, m in summary["per_source"].items()}
    worst = min(sized, key=lambda d: (sized[d]["balanced_acc"], d))
    assert crossval._worst({d: {**m, "samples": 10} for d, m in sized.items()})["dataset"] == worst
    assert "decision (nested calibration)" in (tmp_path / "cv" / "crossval.md").read_text()
    exports = summary["exports"]
    assert exports["acc_exported"] == 1.0 and 0 < exports["samples"] < summary["pooled"]["samples"]
    assert sum(exports["support"].values()) == exports["samples"]
    assert set(exports["recall_exported"].values()) == {1.0}
    weighted = sum(exports["recall_as_read"][c] * n for c, n in exports["support"].items())
    assert weighted / exports["samples"] == pytest.approx(exports["acc_as_read"])
    assert "simulated 8-bit exports" in (tmp_path / "cv" / "crossval.md").read_text()

    # Changing one fold's own predictions leaves that fold's calibration unchanged.
    def sabotaged(fold_dir: Path) -> crossval.FoldPredictions:
        got = _with_probabilities(fold_dir)
        held = json.loads((fold_dir / "summary.json").read_text())["crossval"]["held_out_groups"]
        if held == ["site_f"]:
            got.cnn_probs = [[0.25] * 4 for _ in got.true]
        return got

    again = crossval.run_crossval(pool, tmp_path / "cv2", sabotaged, scheme="logo")
    site_f = next(f["fold"] for f in again["folds"] if f["held_out_groups"] == ["site_f"])
    assert again["nested_calibrations"][str(site_f)] == nested[str(site_f)]


def test_a_finished_fold_is_reused_only_when_complete(tmp_path: Path) -> None:
    import os

    fold = tmp_path / "fold_00"
    (fold / "run" / "checkpoints").mkdir(parents=True)
    ckpt = fold / "run" / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"x")
    assert crossval.finished_fold(fold, exports=False) is None  # never evaluated
    assert not crossval.trained_fold(fold / "run")  # no run_summary.json: killed, or never finished
    (fold / "run" / "run_summary.json").write_text('{"status": "ok"}')
    assert crossval.trained_fold(fold / "run")
    (fold / "eval").mkdir()
    head = "key,shard,dataset,true,predicted,exported," + ",".join(f"cnn_prob_{c}" for c in CLASSES)
    (fold / "eval" / "predictions.csv").write_text(head + "\nk1,s,site_a,CT,CT,0,0.7,0.1,0.1,0.1\n")
    got = crossval.finished_fold(fold, exports=False)
    assert got is not None and got.true == ["CT"] and got.cnn_probs == [[0.7, 0.1, 0.1, 0.1]]
    assert crossval.finished_fold(fold, exports=True) is None  # the export pass is missing
    (fold / "eval_export").mkdir()
    (fold / "eval_export" / "predictions.csv").write_text(head + "\nk1,s,site_a,CT,MR,1,0.1,0.7,0.1,0.1\n")
    assert crossval.finished_fold(fold, exports=True).export_predicted == ["MR"]
    later = (fold / "eval" / "predictions.csv").stat().st_mtime + 10
    os.utime(ckpt, (later, later))  # trained again after that evaluation
    assert crossval.finished_fold(fold, exports=True) is None


def test_a_rerun_reuses_a_fold_only_under_the_same_settings(tmp_path: Path, monkeypatch) -> None:
    """train_and_evaluate_fold with fake child processes: same settings -> nothing runs again; other train
    overrides -> the fold trains again; the fold's own calibration is never fitted on its held-out data."""
    fold = tmp_path / "fold_00"
    fold.mkdir()
    (fold / "summary.json").write_text(
        json.dumps({"crossval": {"held_out_datasets": ["site_a"], "train_datasets": ["site_b"]}})
    )
    calls: list[list[str]] = []
    head = "key,shard,dataset,true,predicted,exported," + ",".join(f"cnn_prob_{c}" for c in CLASSES)

    def fake_run(cmd, log_path, timeout_s) -> None:
        calls.append(list(cmd))
        if cmd[1] == "train.py":
            assert "calibration_splits=null" in cmd
            ckpt = fold / "run" / "checkpoints" / "last.ckpt"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_bytes(b"x")
            (fold / "run" / "run_summary.json").write_text('{"status": "ok"}')
        else:
            out = Path(next(a for a in cmd if a.startswith("out=")).split("=", 1)[1])
            out.mkdir(parents=True, exist_ok=True)
            exported = "1" if "simulate_exports=true" in cmd else "0"
            (out / "predictions.csv").write_text(head + f"\nk,s,site_a,CT,CT,{exported},0.7,0.1,0.1,0.1\n")

    monkeypatch.setattr(crossval, "_run", fake_run)
    first = crossval.train_and_evaluate_fold(fold, ["experiment=x"], [], exports=True)
    assert [c[1] for c in calls] == ["train.py", "eval.py", "eval.py"] and first.export_predicted == ["CT"]
    calls.clear()
    again = crossval.train_and_evaluate_fold(fold, ["experiment=x"], [], exports=True)
    assert calls == [] and again.true == first.true
    crossval.train_and_evaluate_fold(fold, ["experiment=x", "seed=1"], [], exports=True)
    assert [c[1] for c in calls] == ["train.py", "eval.py", "eval.py"]
    # other evaluation settings only: the finished checkpoint is evaluated again, not trained again
    calls.clear()
    crossval.train_and_evaluate_fold(fold, ["experiment=x", "seed=1"], ["decode_budget=1"], exports=True)
    assert [c[1] for c in calls] == ["eval.py", "eval.py"] and "decode_budget=1" in calls[0]

    # killed after the fingerprint changed and before the new evaluation was written: nothing of the old
    # evaluation is left to be read as the new one
    def killed_eval(cmd, log_path, timeout_s) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(crossval, "_run", killed_eval)
    with pytest.raises(RuntimeError, match="killed"):
        crossval.train_and_evaluate_fold(fold, ["experiment=x", "seed=1"], ["decode_budget=2"], exports=True)
    assert not (fold / "eval" / "predictions.csv").exists()
    assert crossval.finished_fold(fold, exports=True) is None
    monkeypatch.setattr(crossval, "_run", fake_run)
    calls.clear()
    crossval.train_and_evaluate_fold(fold, ["experiment=x", "seed=1"], ["decode_budget=2"], exports=True)
    assert [c[1] for c in calls] == ["eval.py", "eval.py"]


def _fused_fold(index: int, confidence: list[float], correct: list[bool], series: list[str]) -> FoldResult:
    """A fused fold of CT slices whose top probability is ``confidence`` (on CT when correct, else on MR)."""
    probs = []
    for c, ok in zip(confidence, correct, strict=True):
        rest = (1 - c) / 3
        row = [rest] * 4
        row[0 if ok else 1] = c
        probs.append(row)
    result = FoldResult(
        index=index,
        held_out_groups=[f"g{index}"],
        true=["CT"] * len(probs),
        predicted=["CT" if ok else "MR" for ok in correct],
        datasets=[f"g{index}"] * len(probs),
        train_classes=list(CLASSES),
        series=series,
    )
    result.extra["probs"] = np.asarray(probs)
    return result


def test_unknown_thresholds_are_fitted_on_the_other_folds_and_series_vote_like_eval() -> None:
    from modality.metrics.calibration import abstention_threshold, fit_confidence_map

    folds = [
        _fused_fold(0, [0.95, 0.9, 0.6, 0.55], [True, True, False, True], ["a", "a", "a", "b"]),
        _fused_fold(1, [0.99, 0.7, 0.65, 0.5], [True, True, False, False], ["c", "c", "d", "d"]),
        _fused_fold(2, [0.8, 0.75, 0.4, 0.35], [True, False, True, False], ["e", "e", "e", "f"]),
    ]
    summary = crossval.confidence_summary(folds, CLASSES, target_accuracy=0.9)
    conf = {0: [0.95, 0.9, 0.6, 0.55], 1: [0.99, 0.7, 0.65, 0.5], 2: [0.8, 0.75, 0.4, 0.35]}
    ok = {0: [1, 1, 0, 1], 1: [1, 1, 0, 0], 2: [1, 0, 1, 0]}
    for row in summary["slice"]["unknown_nested"]["folds"]:
        others = [k for k in conf if k != row["fold"]]  # nested: never the fold itself
        other_conf = np.concatenate([conf[k] for k in others])
        other_ok = np.concatenate([ok[k] for k in others]).astype(bool)
        parts = [{"confidence": np.asarray(conf[k]), "correct": np.asarray(ok[k], bool)} for k in others]
        mapping = crossval._chosen_map(parts)  # chosen on the other folds too
        assert mapping in (fit_confidence_map(other_conf, other_ok), crossval.ConfidenceMap())
        expected = abstention_threshold(mapping(other_conf), other_ok, 0.9)
        assert row["threshold"] == pytest.approx(expected)
        held = mapping(np.asarray(conf[row["fold"]]))
        assert row["answered"] == int(np.sum(held >= expected))
    assert summary["slice"]["accuracy"] == pytest.approx(7 / 12)
    # series votes (majority of slices): a CT (2 of 3), b CT, c CT, d MR (both wrong), e CT (2 of 3), f MR
    assert summary["series"]["n"] == 6
    assert summary["series"]["accuracy"] == pytest.approx(4 / 6)
    # the same series' slices, each series weighted alike: a 2/3, b 1, c 1, d 0, e 2/3, f 0
    assert summary["series"]["slice_accuracy_per_series"] == pytest.approx(
        (2 / 3 + 1 + 1 + 0 + 2 / 3 + 0) / 6
    )
    assert 0 <= summary["slice"]["ece"] <= 1 and set(summary["slice"]["ece_per_class"]) == set(CLASSES)
    assert set(summary["final_thresholds"]) == {"slice", "series"}
    assert set(summary["confidence_maps"]) == {"slice", "series"}
    # one map, fitted on slices, reads both levels (identity, or fitted on all 12 slices)
    assert summary["confidence_maps"]["series"] == summary["confidence_maps"]["slice"]
    assert summary["confidence_maps"]["slice"]["answers"] in (0, 12)
    assert summary["confidence_maps"]["series"]["count_slope"] == 0.0
    assert "Confidence of the fused decision" in crossval._format_confidence(summary)
    assert "their slices' mean accuracy 0.556" in crossval._format_confidence(summary)


def test_a_confidence_map_fitted_on_the_other_folds_calibrates_a_fold_that_errs_like_them() -> None:
    """Every fold's series are right far more often than their stated mean probability (the LOGO finding):
    the nested map brings ECE down on each held-out fold; the stated ECE stays what it was."""
    rng = np.random.default_rng(0)
    folds = []
    for index in range(4):
        stated = rng.uniform(0.4, 0.7, size=60)
        correct = rng.random(60) < 0.9  # right 90% of the time whatever it says
        folds.append(_fused_fold(index, list(stated), list(correct), [f"s{index}_{i}" for i in range(60)]))
    summary = crossval.confidence_summary(folds, CLASSES, target_accuracy=0.95)
    for level in ("slice", "series"):
        assert summary[level]["ece"] > 0.25
        assert summary[level]["ece_calibrated"] < 0.08
    assert summary["confidence_maps"]["slice"]["intercept"] > 1.0  # raises every confidence
    assert summary["slice"]["folds_mapped"] == 4


def test_the_identity_is_kept_where_the_other_folds_show_a_map_does_not_transfer() -> None:
    """One fold confidently wrong, the others right at the same confidence: a map fitted on any three of
    them is wrong for the fourth, so leave-one-fold-out inside the training folds keeps the identity."""
    parts = [
        {"confidence": np.full(50, 0.8), "correct": np.ones(50, bool)},
        {"confidence": np.full(50, 0.8), "correct": np.ones(50, bool)},
        {"confidence": np.full(400, 0.8), "correct": np.zeros(400, bool)},
    ]
    assert crossval._chosen_map(parts) == crossval.ConfidenceMap()
    alike = [{"confidence": np.full(50, 0.6), "correct": np.arange(50) % 10 != 0} for _ in range(3)]
    assert crossval._chosen_map(alike).answers == 150


def test_without_series_ids_there_are_no_series_figures_and_no_series_threshold() -> None:
    folds = [
        _fused_fold(0, [0.95, 0.9, 0.6], [True, True, False], []),
        _fused_fold(1, [0.99, 0.7, 0.65], [True, True, False], []),
    ]
    summary = crossval.confidence_summary(folds, CLASSES, target_accuracy=0.9)
    assert summary["series"] is None and summary["final_thresholds"]["series"] is None
    assert summary["final_thresholds"]["slice"] is not None
    assert "| 0.50 |" in crossval._format_confidence(summary)


def test_series_results_vote_like_eval_and_count_each_series_once() -> None:
    """A 5-slice PT volume whose slices are mostly right is one right answer; a 1-slice MR series called CT
    is one wrong answer: per series both classes weigh alike whatever their slice counts."""
    fold = FoldResult(
        index=0,
        held_out_groups=["g0"],
        true=["PT"] * 5 + ["MR"],
        predicted=[""] * 6,
        datasets=["brain"] * 5 + ["mr"],
        train_classes=list(CLASSES),
        series=["vol"] * 5 + ["s"],
    )
    pt, mr, ct = [0.05, 0.05, 0.85, 0.05], [0.05, 0.85, 0.05, 0.05], [0.85, 0.05, 0.05, 0.05]
    fold.extra["probs"] = np.asarray([pt, pt, pt, mr, mr, ct])
    (series,) = crossval.series_results([fold], CLASSES)
    assert sorted(zip(series.true, series.predicted, series.datasets, strict=True)) == [
        ("MR", "CT", "mr"),
        ("PT", "PT", "brain"),
    ]
    summary = crossval.summarise_folds([series], CLASSES)
    assert summary["pooled"]["balanced_acc"] == pytest.approx(0.5)
    assert crossval.series_results([FoldResult(1, [], ["CT"], ["CT"], ["a"], list(CLASSES))], CLASSES) == []


def test_export_comparison_reports_each_class_where_one_class_dominates_the_pool() -> None:
    """Nine PET slices lost as exports and one CT slice kept: pooled export accuracy 0.1 hides that CT holds."""
    true = ["PT"] * 9 + ["CT", "MR"]
    held = FoldResult(
        index=0,
        held_out_groups=["g"],
        true=true,
        predicted=true,
        datasets=["g"] * 11,
        train_classes=["CT", "PT", "XR"],  # MR never trained on: left out, as in the pooled figures
        export_predicted=["MR"] * 9 + ["CT", None],
    )
    exports = crossval.export_comparison([held], [held], CLASSES)
    assert exports["samples"] == 10 and exports["acc_exported"] == pytest.approx(0.1)
    assert exports["support"] == {"CT": 1, "PT": 9}
    assert exports["recall_exported"] == {"CT": 1.0, "PT": 0.0}
    assert exports["recall_as_read"] == {"CT": 1.0, "PT": 1.0}


def test_a_scored_fold_keeps_only_its_best_and_last_checkpoints(tmp_path: Path) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("epoch_009.ckpt", "epoch_019.ckpt", "best.ckpt", "last.ckpt"):
        (checkpoints / name).write_bytes(b"weights")
    removed = crossval.prune_periodic_checkpoints(checkpoints)
    assert [p.name for p in removed] == ["epoch_009.ckpt", "epoch_019.ckpt"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert crossval.prune_periodic_checkpoints(checkpoints) == []  # nothing left to prune: no error


def _finished_member(fold_dir: Path, sure: float, shift: int, member: Path) -> crossval.FoldPredictions:
    """Stand-in for train + eval that leaves a finished fold in ``member`` (eval.py's two predictions.csv, the
    fingerprint, a checkpoint): its CNN gives probability ``sure`` to the pixel guess moved ``shift`` classes on,
    its value head the truth (abstaining on every third row, where the fused answer is the CNN's); the export
    pass marks even rows exported (the value head abstains there too)."""
    true, predicted, datasets = _predict_from_pixels(fold_dir)
    own = member / fold_dir.name
    (own / "run" / "checkpoints").mkdir(parents=True)
    (own / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    held_out = json.loads((fold_dir / "summary.json").read_text())["crossval"]["held_out_datasets"]
    (own / "fold.json").write_text(json.dumps({"held_out_datasets": held_out}))
    head = ["key", "dataset", "true", "predicted", "exported"] + [
        f"{block}{c}" for block in ("prob_", "cnn_prob_", "values_prob_") for c in CLASSES
    ]
    for name in ("eval", "eval_export"):
        lines = [",".join(head)]
        for i, (t, p, d) in enumerate(zip(true, predicted, datasets, strict=True)):
            guess = CLASSES[(CLASSES.index(p) + shift) % len(CLASSES)]
            cnn = [sure if c == guess else (1 - sure) / 3 for c in CLASSES]
            abstains = i % 3 == 0 or (name == "eval_export" and i % 2 == 0)
            values = [0.97 if c == t else 0.01 for c in CLASSES]
            fused = cnn if abstains else values
            cells = [
                f"k{i}",
                d,
                t,
                CLASSES[int(np.argmax(fused))],
                str(int(name == "eval_export" and i % 2 == 0)),
            ]
            cells += [str(v) for v in (*fused, *cnn)] + ([""] * 4 if abstains else [str(v) for v in values])
            lines.append(",".join(cells))
        (own / name).mkdir()
        (own / name / "predictions.csv").write_text("\n".join(lines) + "\n")
    return crossval.finished_fold(own, exports=True)


def test_an_ensemble_scores_each_fold_on_the_mean_of_its_members_probabilities(
    pool: Path, tmp_path: Path
) -> None:
    members = [tmp_path / "a", tmp_path / "b"]
    # a: 0.9 on the pixel guess; b: 0.95 on the next class, which the mean then prefers (0.49 against 0.46)
    alone = [
        crossval.run_crossval(pool, m, lambda f, m=m, s=s, k=k: _finished_member(f, s, k, m), scheme="logo")
        for m, s, k in zip(members, (0.9, 0.95), (0, 1), strict=True)
    ]
    summary = crossval.run_crossval(
        pool,
        tmp_path / "ens",
        lambda f: crossval.ensemble_fold(f, members, CLASSES, exports=True),
        scheme="logo",
    )
    assert [f["status"] for f in summary["folds"]] == ["ok"] * 4
    assert summary["pooled"]["samples"] == alone[0]["pooled"]["samples"] > 0
    fold = sorted((tmp_path / "ens").glob("fold_*"))[0]
    got = crossval.ensemble_fold(fold, members, CLASSES, exports=True)
    a, b = (crossval.finished_fold(m / fold.name, exports=True) for m in members)
    assert np.allclose(got.cnn_probs, (np.asarray(a.cnn_probs) + np.asarray(b.cnn_probs)) / 2)
    assert got.value_probs == a.value_probs  # one value head in both: its mean is itself
    assert got.keys == [f"k{i}" for i in range(len(got.true))]
    cnn_only = [i for i in range(len(got.true)) if i % 3 == 0]
    assert cnn_only and all(got.predicted[i] == b.predicted[i] != a.predicted[i] for i in cnn_only)
    assert all(got.predicted[i] == got.true[i] for i in range(len(got.true)) if i % 3)  # the value head's
    exported = [i for i, e in enumerate(got.export_predicted) if e is not None]
    assert exported == [i for i in range(len(got.true)) if i % 2 == 0]
    assert all(got.export_predicted[i] == b.export_predicted[i] for i in exported)
    # a member that did not finish a fold, or held out other sources there, fails that fold loudly
    (members[1] / fold.name / "eval_export" / "predictions.csv").unlink()
    with pytest.raises(ValueError, match="not a finished fold"):
        crossval.ensemble_fold(fold, members, CLASSES, exports=True)
    assert crossval.ensemble_fold(fold, members, CLASSES, exports=False).export_predicted == []
    (members[1] / fold.name / "fold.json").write_text(json.dumps({"held_out_datasets": ["elsewhere"]}))
    with pytest.raises(ValueError, match="not a finished fold"):
        crossval.ensemble_fold(fold, members, CLASSES, exports=False)


def test_the_crossval_seed_is_each_folds_training_seed() -> None:
    # seed once chose only the fold plan: seed=1 under logo trained every fold at seed 0 again
    assert crossval.fold_train_overrides(["experiment=x"], 1) == ["experiment=x", "seed=1"]
    assert crossval.fold_train_overrides(["experiment=x"], None) == ["experiment=x"]  # the experiment's own
    assert crossval.fold_train_overrides(["experiment=x", "seed=2"], 2) == ["experiment=x", "seed=2"]
    assert crossval.fold_train_overrides(["experiment=x", "seed=2"], None) == ["experiment=x", "seed=2"]
    with pytest.raises(ValueError, match="different training seeds"):
        crossval.fold_train_overrides(["experiment=x", "++seed=2"], 1)
    with pytest.raises(ValueError, match="integer or null"):
        crossval.fold_train_overrides(["experiment=x"], "one")  # type: ignore[arg-type]  # seed=one on the command line
