"""The collection-level split planner: constraints, determinism, infeasibility messages, and the real IDC index."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from modality.sources.idc.plan import (
    SPLITS,
    PlanConstraints,
    PlanInfeasible,
    check_plan,
    collection_units,
    plan_collections,
    sample_group,
    sample_series,
    write_plan,
)

CLASSES = ("CT", "MR", "PT", "XR")
REGIONS = ("chest", "abdomen", "head_neck", "pelvis")


def synthetic_catalog(n_collections: int = 24, seed: int = 0) -> pd.DataFrame:
    """Series rows shaped like ``select_image_series`` output: every collection has every class, two regions."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_collections):
        collection = f"coll_{c:02d}"
        for k, cls in enumerate(CLASSES):
            for s in range(3):
                rows.append(
                    {
                        "collection_id": collection,
                        "PatientID": f"{collection}-p{s % 2}",
                        "SeriesInstanceUID": f"1.2.{c}.{k}.{s}",
                        "Modality": {"XR": "CR"}.get(cls, cls),
                        "class": cls,
                        "body_part": REGIONS[(c + s) % len(REGIONS)],
                        "instanceCount": int(rng.integers(20, 200)) if cls != "XR" else 1,
                        "series_size_MB": 1.0,
                        "series_aws_url": f"s3://bucket/{collection}-{k}-{s}/*",
                    }
                )
    return pd.DataFrame(rows)


def relaxed(**overrides) -> PlanConstraints:
    settings = {"caps": {}, "restarts": 4}
    settings.update(overrides)
    return PlanConstraints(**settings)


def test_synthetic_plan_meets_every_constraint_and_is_deterministic() -> None:
    catalog = synthetic_catalog()
    constraints = relaxed()
    plan = plan_collections(catalog, CLASSES, constraints)
    assert check_plan(plan, catalog, constraints) == []
    assert set(plan.splits.values()) == set(SPLITS)
    again = plan_collections(catalog, CLASSES, constraints)
    assert again.splits == plan.splits
    pd.testing.assert_frame_equal(again.manifest, plan.manifest)


def test_collections_sharing_a_patient_form_one_unit_and_one_split() -> None:
    catalog = synthetic_catalog()
    # coll_03's first patient also appears in coll_17: the two collections must travel together
    shared = catalog["collection_id"].eq("coll_17") & catalog["PatientID"].eq("coll_17-p0")
    catalog.loc[shared, "PatientID"] = "coll_03-p0"
    units = collection_units(catalog)
    assert units["coll_03"] == units["coll_17"]
    assert len(set(units.values())) == 23
    plan = plan_collections(catalog, CLASSES, relaxed())
    assert plan.splits["coll_03"] == plan.splits["coll_17"]


def test_check_plan_reports_planted_violations() -> None:
    catalog = synthetic_catalog()
    constraints = relaxed()
    plan = plan_collections(catalog, CLASSES, constraints)
    # move one collection's split in the plan only: manifest disagrees, and shares may drift
    moved = next(c for c, s in plan.splits.items() if s == "test")
    plan.splits[moved] = "train"
    violations = check_plan(plan, catalog, constraints)
    assert any(v.startswith("manifest:") for v in violations)
    # an over-cap manifest
    plan = plan_collections(catalog, CLASSES, constraints)
    capped = PlanConstraints(caps={"CT": 10}, restarts=1)
    assert any(v.startswith("caps:") for v in check_plan(plan, catalog, capped))
    # a patient in two splits
    train_collection = next(c for c, s in plan.splits.items() if s == "train")
    test_collection = next(c for c, s in plan.splits.items() if s == "test")
    leaked = catalog.copy()
    leaked.loc[leaked["collection_id"].eq(test_collection), "PatientID"] = f"{train_collection}-p0"
    assert any(v.startswith("patients:") for v in check_plan(plan, leaked, constraints))


def test_caps_sample_slices_evenly_within_every_series_before_dropping_any() -> None:
    counts = np.array([100, 50, 10])
    kept, steps = sample_group(counts, np.array([0, 1, 2]), target=40, rng=np.random.default_rng(0))
    assert kept.sum() <= 40
    assert (kept >= 1).all()  # every series, hence every patient, still contributes
    assert kept[0] > kept[1] > kept[2]  # one common step: proportional to series length
    assert len(set(steps[kept > 1])) == 1
    # fewer slots than series: one slice from as many different patients as possible
    counts = np.array([5, 5, 5, 5, 5, 5])
    patients = np.array([0, 0, 0, 1, 1, 2])
    kept, _ = sample_group(counts, patients, target=3, rng=np.random.default_rng(1))
    assert kept.sum() == 3
    assert set(patients[kept > 0]) == {0, 1, 2}


def test_caps_and_budget_hold_in_the_manifest() -> None:
    catalog = synthetic_catalog()
    constraints = relaxed(caps={"CT": 120, "MR": 200}, budget=6000)
    sampled = sample_series(catalog, constraints)
    per_group = sampled.groupby(["collection_id", "class"])["images_kept"].sum()
    assert per_group.xs("CT", level="class").max() <= 120
    assert per_group.xs("MR", level="class").max() <= 200
    assert sampled["images_kept"].sum() <= 6000
    # the budget thins multi-slice series rather than dropping them (one-image radiographs can only be dropped)
    assert (sampled.loc[sampled["class"] != "XR", "images_kept"] >= 1).all()


def test_exclusions_and_pins_are_honoured() -> None:
    catalog = synthetic_catalog()
    constraints = relaxed(exclude=("coll_0[01]",), pins={"coll_05": "test", "coll_06": "val"})
    plan = plan_collections(catalog, CLASSES, constraints)
    assert "coll_00" not in plan.splits and "coll_01" not in plan.splits
    assert plan.splits["coll_05"] == "test" and plan.splits["coll_06"] == "val"
    assert check_plan(plan, catalog, constraints) == []


def test_infeasible_plan_names_the_binding_constraint() -> None:
    catalog = synthetic_catalog(n_collections=6)
    # one collection holds nearly all PT images: no split but train can take it, and not even train (> 75%)
    catalog.loc[catalog["collection_id"].eq("coll_00") & catalog["class"].eq("PT"), "instanceCount"] = 100_000
    with pytest.raises(PlanInfeasible, match=r"coll_00 holds 9\d% of PT images"):
        plan_collections(catalog, CLASSES, relaxed())
    # a single region for XR everywhere: the body-part constraint binds
    catalog = synthetic_catalog(n_collections=6)
    catalog.loc[catalog["class"].eq("XR"), "body_part"] = "chest"
    with pytest.raises(PlanInfeasible, match="body parts: XR has 1 known region"):
        plan_collections(catalog, CLASSES, relaxed())


def test_write_plan_outputs_are_loadable(tmp_path) -> None:
    catalog = synthetic_catalog()
    constraints = relaxed()
    plan = plan_collections(catalog, CLASSES, constraints)
    paths = write_plan(plan, tmp_path, constraints, download_root="/data/idc")
    assert yaml.safe_load(paths["plan"].read_text()) == plan.splits
    manifest = pd.read_csv(paths["manifest"])
    assert {"SeriesInstanceUID", "split", "class", "images_kept", "slice_step"} <= set(manifest.columns)
    assert manifest["images_kept"].sum() == plan.manifest["images_kept"].sum()
    pool = yaml.safe_load(paths["dataset"].read_text())
    assert pool["split"] == plan.splits and pool["sources"][0]["root"] == "/data/idc"
    summary = json.loads(paths["summary"].read_text())
    assert set(summary["splits"]) == set(SPLITS)
    assert paths["chart"].stat().st_size > 1000


# --- the real IDC index -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_series() -> pd.DataFrame:
    pytest.importorskip("idc_index_data")
    from modality.labels import BodyPartMap, ClassMap
    from modality.sources.idc.catalog import read_index, select_image_series

    class_map = ClassMap.default()
    return select_image_series(
        read_index(codes=class_map.codes), class_map.class_of, BodyPartMap.default().normalise
    )


@pytest.fixture(scope="module")
def default_constraints() -> PlanConstraints:
    from hydra import compose, initialize_config_dir

    from modality.commands.idc_plan import constraints_from_cfg
    from modality.paths import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return constraints_from_cfg(compose(config_name="idc_plan"))


@pytest.fixture(scope="module")
def real_plan(real_series, default_constraints):
    started = time.perf_counter()
    plan = plan_collections(real_series, CLASSES, default_constraints)
    return plan, time.perf_counter() - started


def test_real_plan_meets_every_constraint_and_has_the_reference_shape(
    real_plan, real_series, default_constraints
) -> None:
    plan, seconds = real_plan
    assert check_plan(plan, real_series, default_constraints) == []
    assert set(plan.manifest["class"].astype(str)) == set(CLASSES)
    assert set(plan.splits.values()) == set(SPLITS)
    for split in SPLITS:
        rows = plan.manifest[plan.manifest["split"] == split]
        assert set(rows["class"].astype(str)) == set(CLASSES), split
    # no patient in two splits, over every series of the planned collections (kept or not)
    placed = real_series[real_series["collection_id"].astype(str).isin(list(plan.splits))]
    splits_per_patient = placed.assign(split=placed["collection_id"].astype(str).map(plan.splits))
    assert splits_per_patient.groupby("PatientID")["split"].nunique().max() == 1
    assert not any(c in ("victre", "catch", "mri_dir") or "phantom" in c for c in plan.splits)
    assert seconds < 60, f"planner took {seconds:.1f} s"


def test_real_plan_same_seed_same_plan(real_plan, real_series, default_constraints) -> None:
    plan, _ = real_plan
    again = plan_collections(real_series, CLASSES, default_constraints)
    assert again.splits == plan.splits
    assert again.manifest["images_kept"].equals(plan.manifest["images_kept"])


def test_real_index_without_an_xr_cap_reports_the_share_constraint(real_series, default_constraints) -> None:
    constraints = PlanConstraints(
        caps={"CT": 50_000, "MR": 100_000}, exclude=tuple(default_constraints.exclude), restarts=0
    )
    with pytest.raises(PlanInfeasible, match="no grouping of whole collections gives XR a share"):
        plan_collections(real_series, CLASSES, constraints)


def test_plan_cli_exits_nonzero_with_the_binding_constraint(tmp_path) -> None:
    # a small index file shaped like the real one keeps the subprocess fast
    pytest.importorskip("duckdb")
    catalog = synthetic_catalog(n_collections=6).rename(columns={"body_part": "BodyPartExamined"})
    catalog["BodyPartExamined"] = catalog["BodyPartExamined"].str.upper()
    catalog["analysis_result_id"] = None
    catalog["sop_class_name"] = "CT Image Storage"
    for column in ("StudyInstanceUID", "aws_bucket", "crdc_series_uuid"):
        catalog[column] = "x"
    index_path = tmp_path / "index.parquet"
    catalog.drop(columns=["class"]).to_parquet(index_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modality.commands.idc_plan",
            f"index_path={index_path}",
            f"out={tmp_path / 'plan'}",
            "min_body_parts=5",
            "restarts=0",
            "exclude=[]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "body parts" in result.stderr
    assert not (tmp_path / "plan" / "plan.yaml").exists()


def test_real_plan_with_a_budget_thins_series_and_keeps_breadth(
    real_plan, real_series, default_constraints
) -> None:
    full, _ = real_plan
    constraints = PlanConstraints(**{**default_constraints.__dict__, "budget": 200_000, "restarts": 1})
    plan = plan_collections(real_series, CLASSES, constraints)
    assert check_plan(plan, real_series, constraints) == []
    assert plan.manifest["images_kept"].sum() <= 200_000
    # a budget 30x below the full plan still samples tens of thousands of series from nearly every collection
    assert plan.manifest["SeriesInstanceUID"].nunique() > 50_000
    assert plan.manifest["collection_id"].nunique() >= 0.95 * full.manifest["collection_id"].nunique()
