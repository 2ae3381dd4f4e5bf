"""One leakage policy (modality/shards/policy.py): prepare, crossval, the audit and the IDC planner all ask it
which patient ids name nobody and how linked sources group, so a placeholder means the same in every command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prepare_helpers import write_dicom

from modality import crossval
from modality.commands import audit
from modality.labels import BodyPartMap, ClassMap
from modality.shards import listing, policy, splits
from modality.shards.build import BuildSettings, build_shards
from modality.shards.splits import LeakageError, PatientSighting, guard_patients
from modality.sources.folders import DicomFolderSource
from modality.sources.idc import plan as idc_plan

PLACEHOLDERS = [
    "",
    "   ",
    "0",
    " 0 ",
    "none",
    "None",
    "NULL",
    "nan",
    "NaN",
    "n/a",
    "N/A",
    "na",
    "unknown",
    "UNKNOWN ",
    "anonymous",
    " Anonymous",
    "ANON",
    "ANONYMIZE",
    "Anonymized",
    "anonymised",
    "X",
    "xx",
    "XXXXXX",
    "x" * 64,
]
REAL_IDS = ["P1", "00", "1", "ANON100", "anonymous-7", "XA", "NA-12", "0010", "CQ500-CT-310", "x1"]


def test_placeholder_ids_are_stripped_case_insensitive_and_none_is_empty() -> None:
    for pid in PLACEHOLDERS:
        assert policy.is_placeholder_patient_id(pid), pid
    for pid in REAL_IDS:
        assert not policy.is_placeholder_patient_id(pid), pid
    assert policy.is_placeholder_patient_id(None)
    # the list is the union of the three that disagreed before (prepare, audit, crossval), plus what the
    # shared corpus holds
    assert {"", "0", "none", "nan", "anonymous", "anon", "unknown", "null", "n/a", "na"} <= (
        policy.PLACEHOLDER_PATIENT_IDS
    )


def test_connected_groups_follows_chains_and_names_each_group_by_its_smallest_node() -> None:
    shared = [("c", "k1"), ("b", "k1"), ("b", "k2"), ("a", "k2"), ("e", "k3"), ("f", "k4")]
    groups = policy.connected_groups(["f", "e", "d", "c", "b", "a"], shared)
    assert groups == {"f": "f", "e": "e", "d": "d", "c": "a", "b": "a", "a": "a"}
    assert list(groups) == ["f", "e", "d", "c", "b", "a"]  # the given order
    assert policy.connected_groups([], [("z", 1), ("y", 1)]) == {"z": "y", "y": "y"}


# --- each consumer, asked whether two sources in different splits share a patient --------------------------


def prepare_links(pid: str) -> bool:
    try:
        guard_patients(
            [
                PatientSighting(pid, "site_a", "train", "a.dcm"),
                PatientSighting(pid, "site_b", "test", "b.dcm"),
            ]
        )
    except LeakageError:
        return True
    return False


def crossval_links(pid: str) -> bool:
    samples = [
        crossval.StoredSample("train-000000.tar", "k1", "site_a", "CT", pid, "h1"),
        crossval.StoredSample("test-000000.tar", "k2", "site_b", "CT", pid, "h2"),
    ]
    groups = crossval.group_sources(samples)
    return groups["site_a"] == groups["site_b"]


def _audit_members(pid: str, dataset: str, seed: int) -> dict[str, bytes]:
    from modality.shards.png_codec import encode_png_up

    image = np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)
    meta = {
        "dataset": dataset,
        "class": "CT",
        "patient_id": pid,
        "series_uid": f"{dataset}.1",
        "pixel_hash": "",
    }
    return {"png": encode_png_up(image), "cls": b"0", "json": json.dumps(meta).encode()}


def audit_links(pid: str) -> bool:
    samples = [
        audit.audit_sample("train", "train-000000.tar", "k1", _audit_members(pid, "site_a", 1)),
        audit.audit_sample("test", "test-000000.tar", "k2", _audit_members(pid, "site_b", 2)),
    ]
    return bool(audit.find_leaks(samples).patients_across_splits)


def planner_links(pid: str) -> bool:
    series = pd.DataFrame({"collection_id": ["coll_a", "coll_b"], "PatientID": [pid, pid]})
    units = idc_plan.collection_units(series)
    return units["coll_a"] == units["coll_b"]


def _two_collection_plan(pid: str) -> tuple[idc_plan.Plan, pd.DataFrame]:
    """coll_a in train and coll_b in test, one CT series each, both from patient ``pid``."""
    catalog = pd.DataFrame(
        {
            "collection_id": ["coll_a", "coll_b"],
            "PatientID": [pid, pid],
            "SeriesInstanceUID": ["1.1", "1.2"],
            "class": ["CT", "CT"],
            "body_part": ["chest", "chest"],
            "instanceCount": [10, 10],
        }
    )
    manifest = catalog.assign(split=["train", "test"], images_kept=[10, 10])
    splits = {"coll_a": "train", "coll_b": "test"}
    plan = idc_plan.Plan(splits=splits, manifest=manifest, units={"coll_a": 0, "coll_b": 1}, classes=("CT",))
    return plan, catalog


def plan_check_links(pid: str) -> bool:
    plan, catalog = _two_collection_plan(pid)
    violations = idc_plan.check_plan(plan, catalog, idc_plan.PlanConstraints(caps={}))
    return any(line.startswith("patients:") for line in violations)


CONSUMERS = {
    "prepare": prepare_links,
    "crossval": crossval_links,
    "audit": audit_links,
    "planner": planner_links,
    "plan check": plan_check_links,
}


@pytest.mark.parametrize("pid", PLACEHOLDERS + REAL_IDS)
def test_every_consumer_treats_a_patient_id_alike(pid: str) -> None:
    links = {name: ask(pid) for name, ask in CONSUMERS.items()}
    expected = not policy.is_placeholder_patient_id(pid)
    assert links == dict.fromkeys(CONSUMERS, expected), pid


def test_every_consumer_follows_the_policy_when_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Swap the policy's function: each consumer changes its answer, so none keeps a list of its own."""
    assert all(ask("SHARED-7") for ask in CONSUMERS.values())
    monkeypatch.setattr(policy, "is_placeholder_patient_id", lambda pid: str(pid).startswith("SHARED"))
    assert not any(ask("SHARED-7") for ask in CONSUMERS.values())
    assert all(ask("anonymous") for ask in CONSUMERS.values())


def test_the_plan_check_reports_no_leak_for_collections_sharing_only_a_placeholder() -> None:
    """The planner puts two collections sharing only ``"Anonymous"`` in different splits (collection_units
    leaves them apart); its own check must not call that plan a leak."""
    series = pd.DataFrame({"collection_id": ["coll_a", "coll_b"], "PatientID": ["Anonymous", "Anonymous"]})
    assert len(set(idc_plan.collection_units(series).values())) == 2
    plan, catalog = _two_collection_plan("Anonymous")
    violations = idc_plan.check_plan(plan, catalog, idc_plan.PlanConstraints(caps={}))
    assert not any(line.startswith("patients:") for line in violations), violations
    plan, catalog = _two_collection_plan("P1")
    violations = idc_plan.check_plan(plan, catalog, idc_plan.PlanConstraints(caps={}))
    assert any(line.startswith("patients: 1 patient id(s)") for line in violations), violations


def test_crossval_and_the_planner_group_through_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = policy.connected_groups

    def spy(nodes, shared):  # same signature as policy.connected_groups
        calls.append("called")
        return real(nodes, shared)

    monkeypatch.setattr(policy, "connected_groups", spy)
    assert crossval_links("P1") and planner_links("P1")
    assert len(calls) == 2


def test_the_splits_are_defined_once() -> None:
    for module in (splits, crossval, listing, idc_plan):
        assert module.SPLITS is policy.SPLITS, module.__name__


def test_prepare_itself_follows_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard prepare runs on real files (not only guard_patients): refused, then written once the policy
    calls that id a placeholder."""
    write_dicom(tmp_path / "data/site_a/x.dcm", patient_id="SHARED-7", seed=1, size=16)
    write_dicom(tmp_path / "data/site_b/y.dcm", patient_id="SHARED-7", seed=2, size=16)
    split = {"site_a": "train", "site_b": "test"}
    items = [
        item for dataset in split for item in DicomFolderSource(tmp_path / "data" / dataset, dataset).items()
    ]

    def build(out: Path) -> None:
        build_shards(
            items,
            BuildSettings(
                out_dir=out,
                split_of=split,
                class_map=ClassMap.default(),
                body_part_map=BodyPartMap.default(),
                preprocess={
                    "image_size": 16,
                    "aspect": "pad",
                    "scaling": {"method": "minmax"},
                    "colour": "grey",
                },
                caps={},
                workers=0,
                progress=False,
                charts=False,
            ),
        )

    with pytest.raises(LeakageError, match="SHARED-7"):
        build(tmp_path / "refused")
    monkeypatch.setattr(policy, "is_placeholder_patient_id", lambda pid: str(pid).startswith("SHARED"))
    build(tmp_path / "written")
    summary = json.loads((tmp_path / "written/summary.json").read_text())
    assert summary["splits"]["train"]["samples"] == 1 and summary["splits"]["test"]["samples"] == 1
