"""Dataset-level split map checks and the two leakage guards, on hand-built sightings."""

from __future__ import annotations

import pytest

from modality.shards.splits import (
    ImageSighting,
    LeakageError,
    PatientSighting,
    check_split_map,
    find_patient_collisions,
    guard_identical_images,
    guard_patients,
)


def test_split_map_names_every_missing_dataset() -> None:
    with pytest.raises(ValueError, match="site_b, site_c"):
        check_split_map(["site_a", "site_b", "site_c"], {"site_a": "train"})


def test_split_map_rejects_unknown_split_names() -> None:
    with pytest.raises(ValueError, match="validation"):
        check_split_map(["site_a"], {"site_a": "validation"})


def test_split_map_accepts_complete_map_with_extra_entries() -> None:
    check_split_map(["a"], {"a": "train", "unused": "test"})


def test_patient_guard_names_patient_datasets_and_splits() -> None:
    sightings = [
        PatientSighting("P1", "site_a", "train", "/a/1.dcm"),
        PatientSighting("P1", "site_a", "train", "/a/2.dcm"),
        PatientSighting("P2", "site_b", "val", "/b/1.dcm"),
        PatientSighting("P1", "site_c", "test", "/c/9.dcm"),
    ]
    with pytest.raises(LeakageError) as info:
        guard_patients(sightings)
    message = str(info.value)
    assert "'P1'" in message and "site_a (train" in message and "site_c (test" in message
    assert "P2" not in message


def test_patient_guard_allows_same_patient_in_two_datasets_of_one_split() -> None:
    guard_patients([PatientSighting("P1", "a", "train", "x"), PatientSighting("P1", "b", "train", "y")])


def test_empty_patient_ids_identify_nobody() -> None:
    sightings = [PatientSighting("", "a", "train", "x"), PatientSighting("  ", "b", "val", "y")]
    assert find_patient_collisions(sightings) == {}


def test_identical_image_in_two_splits_is_refused_with_both_paths() -> None:
    sightings = [
        ImageSighting("h1", "train", "a", "/a/img.dcm", 0),
        ImageSighting("h1", "test", "b", "/b/copy.dcm", 0),
    ]
    with pytest.raises(LeakageError) as info:
        guard_identical_images(sightings)
    assert "/a/img.dcm" in str(info.value) and "/b/copy.dcm" in str(info.value)


def test_duplicates_within_a_split_keep_the_first_in_sorted_order() -> None:
    sightings = [
        ImageSighting("h1", "train", "b", "/b/copy.dcm", 0),
        ImageSighting("h1", "train", "a", "/a/img.dcm", 3),
        ImageSighting("h2", "train", "a", "/a/other.dcm", 0),
    ]
    duplicates = guard_identical_images(sightings)
    assert len(duplicates) == 1
    assert duplicates[0].sighting.path == "/b/copy.dcm"
    assert duplicates[0].original.path == "/a/img.dcm"
