"""The body-part head (issue 16): labels from tag / source / dataset fact, the masked loss, a tiny training run
with ``model.body_part=true`` (metrics.json, TensorBoard, CSV) and raw-file prediction's region check."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from prepare_helpers import write_dicom
from train_helpers import explain, run_summary, run_train

from modality.labels import BodyPartMap, ClassMap
from modality.labels.body_parts import check_dataset_facts, resolve_region
from modality.models.classifier import ModalityClassifier, masked_region_loss
from modality.shards.build import BuildSettings, build_shards
from modality.shards.reader import read_shard_samples
from modality.sources.folders import DicomFolderSource

MAP = BodyPartMap.default()
SPLIT = {"site_a": "train", "site_b": "train", "site_c": "val", "site_d": "test"}
#: site -> BodyPartExamined per file (CT / MR alternate); "" = tag empty
TAGS = {
    "site_a": ["CHEST", "HEAD", "", "EXTREMITY", "ABDOMEN", "HEAD"],
    "site_b": ["", "", "", ""],  # the dataset fact (knee) fills these
    "site_c": ["CHEST", "BRAIN", "", "PELVIS"],
    "site_d": ["CHEST", "HEAD", "EXTREMITY", "PROSTATE"],
}
FACTS = {"site_b": "knee"}


# ------------------------------------------------------------------------------------------------ labels


def test_region_comes_from_the_tag_then_the_source_then_the_dataset_fact() -> None:
    assert resolve_region("Thorax", "HAND", "knee", MAP) == ("chest", "tag")
    assert resolve_region("", "KNEE", "hand", MAP) == ("lower_limb", "source")
    # an unmapped tag (EXTREMITY: arm or leg) is filled by the dataset fact, never guessed
    assert resolve_region("EXTREMITY", None, "upper_limb", MAP) == ("upper_limb", "dataset")
    assert resolve_region("EXTREMITY", None, None, MAP) == ("unknown", "none")
    assert resolve_region(None, None, None, MAP) == ("unknown", "none")
    # the coarse layer: abdomen and pelvis are one head region, a phantom is no body region
    assert resolve_region("PROSTATE", None, None, MAP) == ("abdomen_pelvis", "tag")
    assert resolve_region("PHANTOM", None, "chest", MAP) == ("chest", "dataset")
    assert "unknown" not in MAP.head_region_names and "abdomen_pelvis" in MAP.head_region_names


def test_dataset_facts_must_name_a_head_region_and_maps_round_trip() -> None:
    assert check_dataset_facts({"a": "CHEST", "b": "hand", "c": "head_neck"}, MAP) == {
        "a": "chest",
        "b": "upper_limb",
        "c": "head_neck",
    }
    with pytest.raises(ValueError, match="names no head region"):
        check_dataset_facts({"a": "chets"}, MAP)
    restored = BodyPartMap.from_config(json.loads(json.dumps(MAP.to_dict())))
    assert restored.head_region_names == MAP.head_region_names and restored.coarse == MAP.coarse
    with pytest.raises(ValueError, match="map to no head region"):
        BodyPartMap.from_config({**MAP.to_dict(), "head_regions": ["chest"]})


def test_masked_loss_ignores_unknown_rows() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    regions = torch.tensor([2, -1, 0, -1])
    loss, known = masked_region_loss(logits, regions)
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], regions[[0, 2]])
    assert torch.allclose(loss, expected) and known.tolist() == [True, False, True, False]
    loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[3].abs().sum() == 0
    # no known row: 0, not NaN, so an all-unknown batch trains the modality head alone
    assert masked_region_loss(logits, torch.full((4,), -1))[0].item() == 0.0


def test_a_batch_of_unknown_regions_trains_exactly_the_modality_loss() -> None:
    data_info = {"classes": ["CT", "MR", "PT", "XR"], "regions": list(MAP.head_region_names)}
    model = ModalityClassifier(network="resnet18", data_info=data_info, body_part=True).eval()
    images, labels = torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 3])
    with_unknown = model._shared_step((images, labels, torch.full((3,), -1)), "val")
    plain = torch.nn.functional.cross_entropy(model(images), labels)
    assert torch.allclose(with_unknown, plain)
    logits, region_logits = model.forward_heads(images)
    assert torch.allclose(logits, model(images), atol=1e-5) and region_logits.shape == (3, 8)
    with pytest.raises(ValueError, match="data_info"):
        ModalityClassifier(network="resnet18", data_info={"classes": ["CT"]}, body_part=True)


# ------------------------------------------------------------------------------------ prepare + train + eval


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Raw DICOM (2-frame files, 32 px) and its prepared shards with the dataset fact for site_b."""
    root = tmp_path_factory.mktemp("raw")
    seed = 0
    for site, tags in TAGS.items():
        for i, tag in enumerate(tags):
            seed += 1
            write_dicom(
                root / site / f"p{i}" / "im.dcm",
                modality="CT" if i % 2 == 0 else "MR",
                patient_id=f"{site}-p{i}",
                seed=seed,
                frames=2,
                size=32,
                body_part=tag,
            )
    out = tmp_path_factory.mktemp("prepared")
    items = [item for site in SPLIT for item in DicomFolderSource(root / site, site).items()]
    build_shards(
        items,
        BuildSettings(
            out_dir=out,
            split_of=SPLIT,
            class_map=ClassMap.default(),
            body_part_map=MAP,
            preprocess={
                "image_size": 32,
                "aspect": "pad",
                "scaling": {"method": "percentile"},
                "colour": "grey",
            },
            workers=0,
            progress=False,
            charts=False,
            dataset_body_parts=check_dataset_facts(FACTS, MAP),
        ),
    )
    return root, out


def _metas(prepared: Path, split: str) -> list[dict]:
    return [
        json.loads(members["json"])
        for shard in sorted((prepared / "shards").glob(f"{split}-*.tar"))
        for _, members in read_shard_samples(shard)
    ]


def test_prepare_records_each_samples_region_and_its_origin(pool: tuple[Path, Path]) -> None:
    _, prepared = pool
    train = _metas(prepared, "train")
    by_site = {(m["dataset"], m["body_part_raw"]): (m["region"], m["region_from"]) for m in train}
    assert by_site[("site_a", "CHEST")] == ("chest", "tag")
    assert by_site[("site_a", "")] == ("unknown", "none")
    assert by_site[("site_a", "EXTREMITY")] == ("unknown", "none")
    assert by_site[("site_b", "")] == ("lower_limb", "dataset")
    summary = json.loads((prepared / "summary.json").read_text())
    assert summary["regions"] == list(MAP.head_region_names)
    assert summary["splits"]["train"]["by_region"] == {
        "abdomen_pelvis": 2,
        "chest": 2,
        "head_neck": 4,
        "lower_limb": 8,
        "unknown": 4,
    }


@pytest.fixture(scope="module")
def body_part_run(pool: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, prepared = pool
    run_dir = tmp_path_factory.mktemp("run")
    result = run_train(
        prepared,
        [
            "trainer.max_epochs=2",
            "model.body_part=true",
            "model.body_part_weight=0.5",
            "model.channels_last=false",
            f"hydra.run.dir={run_dir}",
        ],
    )
    assert result.returncode == 0, explain(result)
    return run_dir


def test_training_logs_both_heads_and_counts_only_known_regions(
    pool: tuple[Path, Path], body_part_run: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, prepared = pool
    summary = run_summary(body_part_run)
    known_val = sum(m["region"] != "unknown" for m in _metas(prepared, "val"))
    assert summary["val"]["samples"] == len(_metas(prepared, "val"))
    assert summary["val"]["region_samples"] == known_val < summary["val"]["samples"]
    assert 0.0 <= summary["val"]["region_balanced_acc"] <= 1.0
    expected = {
        "train/region_loss",
        "train/region_acc",
        "val/region_acc",
        "val/region_balanced_acc",
        "val/loss",
    }
    with (body_part_run / "csv" / "metrics.csv").open() as handle:
        assert expected <= set(next(csv.reader(handle)))
    events = EventAccumulator(str(body_part_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert expected <= set(events.Tags()["scalars"])
    assert "val/region_confusion_matrix" in events.Tags()["images"]
    checkpoint = torch.load(
        body_part_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["hyper_parameters"]["body_part"] is True
    assert "region_head.weight" in checkpoint["state_dict"]


def test_the_region_head_trains_under_ddp_and_counts_each_sample_once(
    pool: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two gloo ranks (`trainer=ddp_cpu`) with the body-part head: no hang, and both heads' validation metrics
    are synced across ranks: every validation sample counted once, every known region once."""
    _, prepared = pool
    run_dir = tmp_path / "ddp"
    result = run_train(
        prepared,
        [
            "trainer=ddp_cpu",
            "trainer.max_epochs=1",
            "model.body_part=true",
            "model.channels_last=false",
            "data.batch_size=4",
            "data.eval_batch_size=4",
            "test=false",
            f"hydra.run.dir={run_dir}",
        ],
        timeout_s=420,  # a hang would otherwise wait for gloo's 30 min timeout
    )
    assert result.returncode == 0, explain(result)
    summary = run_summary(run_dir)
    val = _metas(prepared, "val")
    assert summary["val"]["samples"] == len(val)
    assert summary["val"]["region_samples"] == sum(m["region"] != "unknown" for m in val)


def _compose_eval(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from modality.paths import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=["trainer=cpu", "timing.enabled=false", *overrides])


def test_eval_writes_the_region_block_and_columns(pool: tuple[Path, Path], body_part_run: Path) -> None:
    from modality.evaluation.shard_split import evaluate_from_config

    _, prepared = pool
    metrics = evaluate_from_config(_compose_eval([f"ckpt_path={body_part_run}"]))
    region = metrics["region"]
    test = _metas(prepared, "test")
    assert region["unknown"] == sum(m["region"] == "unknown" for m in test) == 2
    assert region["samples"] == len(test) - 2
    assert region["regions"] == list(MAP.head_region_names)
    assert json.loads((body_part_run / "eval" / "metrics.json").read_text())["region"] == region
    with (body_part_run / "eval" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"region", "region_predicted", "region_correct", "region_prob_chest"} <= set(rows[0])
    assert sorted(r["region_correct"] for r in rows if r["region"] == "unknown") == ["", ""]
    assert (body_part_run / "eval" / "region_confusion_matrix.csv").is_file()


def test_raw_file_prediction_writes_regions_and_checks_the_tag(
    pool: tuple[Path, Path], body_part_run: Path, tmp_path: Path
) -> None:
    from modality.evaluation.predict import REGION_CHECKS, predict_from_config

    raw, _ = pool
    out = tmp_path / "pred"
    ckpt = body_part_run / "checkpoints" / "last.ckpt"
    result = predict_from_config(_compose_eval([f"ckpt_path={ckpt}", f"input={raw}", f"out={out}"]))
    with (out / "predictions.csv").open() as handle:
        slices = list(csv.DictReader(handle))
    with (out / "series_votes.csv").open() as handle:
        votes = list(csv.DictReader(handle))
    assert {"region_predicted", "region_probability", "header_region", "region_mismatch"} <= set(slices[0])
    assert {"region_voted", "region_check", "header_region_collection_wide"} <= set(votes[0])
    by_tag = {r["header_body_part"]: r["header_region"] for r in slices}
    assert by_tag["PROSTATE"] == "abdomen_pelvis" and by_tag["EXTREMITY"] == "unknown" and by_tag[""] == ""
    # site_b tags nothing: all missing; site_a's EXTREMITY is missing too (no region the head knows)
    assert all(v["region_check"] == "missing" for v in votes if "/site_b/" in v["middle_path"])
    assert {v["region_check"] for v in votes} <= set(REGION_CHECKS)
    assert result["region_check"]["checks"]["missing"] == sum(v["region_check"] == "missing" for v in votes)


def test_region_check_flags_missing_contradictory_and_collection_wide_tags() -> None:
    from modality.evaluation.predict import region_votes

    regions = ["head_neck", "chest"]

    def row(series: str, tag: str, header_region: str, chest: float) -> dict:
        return {
            "series": series,
            "header_body_part": tag,
            "header_region": header_region,
            "region_predicted": "chest" if chest > 0.5 else "head_neck",
            "region_prob_head_neck": 1 - chest,
            "region_prob_chest": chest,
            "region_mismatch": 0,
        }

    rows = [
        row("s1", "CHEST", "chest", 0.99),  # collection-wide CHEST, agrees
        row("s2", "CHEST", "chest", 0.02),  # collection-wide CHEST, the pixels say head: contradicts
        row("s3", "", "", 0.9),  # no tag: missing
        row("s4", "HEAD", "head_neck", 0.1),  # agrees
        row("s5", "", "", 0.9),  # a PNG: no header at all
    ]
    votes = [
        {"series": "s1", "header_modality": "CT", "source": "wide"},
        {"series": "s2", "header_modality": "CT", "source": "wide"},
        {"series": "s3", "header_modality": "MR", "source": "other"},
        {"series": "s4", "header_modality": "MR", "source": "other"},
        {"series": "s5", "header_modality": "", "source": "other"},
    ]
    summary = region_votes(votes, rows, regions, threshold=0.9)
    assert [v["region_check"] for v in votes] == ["collection_wide", "contradicts", "missing", "agrees", ""]
    assert [v["header_region_collection_wide"] for v in votes] == [1, 1, 0, 0, 0]
    assert summary["collection_wide_sources"] == {"wide": {"value": "CHEST", "series": 2, "contradicted": 1}}
    assert summary["checks"] == {"missing": 1, "contradicts": 1, "collection_wide": 1, "agrees": 1}
