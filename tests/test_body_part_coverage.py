"""Body-part normalisation covers the real BodyPartExamined vocabulary (issue 5, item 5).

The table below is every distinct value in the IDC index bundled with idc-index (all modalities), each with
the region it must map to; the live check re-reads the index and asserts coverage >= 95% on image series.
"""

from __future__ import annotations

import pytest

from modality.labels.body_parts import REGIONS, UNKNOWN, BodyPartMap, coverage

IDC_VALUES = [
    ("ABDOMEN", "abdomen"),
    ("ABDOMENPELVIS", "abdomen"),
    ("ADRENAL", "abdomen"),
    ("ANKLE", "lower_limb"),
    ("AORTA", "chest"),
    ("BD CT ABD WO_W C", "abdomen"),
    ("BLADDER", "pelvis"),
    ("BODY", "whole_body"),
    ("BONYPELVIS", "pelvis"),
    ("BRAIN", "head_neck"),
    ("BREAST", "breast"),
    ("CALF", "lower_limb"),
    ("CERVIX", "pelvis"),
    ("CHEST", "chest"),
    ("CHEST (THORAX) W", "chest"),
    ("CHESTABDOMEN", "chest"),
    ("CHESTABDPELVIS", "whole_body"),
    ("COCCYX", "spine"),
    ("COLON", "abdomen"),
    ("CSPINE", "spine"),
    ("CTSPINE", "spine"),
    ("EAR", "head_neck"),
    ("ELBOW", "upper_limb"),
    ("ESOPHAGUS", "chest"),
    ("EXTREMITY", "unknown"),
    ("EYE", "head_neck"),
    ("FEMORALA", "lower_limb"),
    ("FEMUR", "lower_limb"),
    ("FOOT", "lower_limb"),
    ("FUSION", "unknown"),
    ("HEAD", "head_neck"),
    ("HEADNECK", "head_neck"),
    ("HEART", "chest"),
    ("HIP", "pelvis"),
    ("IAC", "head_neck"),
    ("KIDNEY", "abdomen"),
    ("KNEE", "lower_limb"),
    ("LEG", "lower_limb"),
    ("LIVER", "abdomen"),
    ("LOWERLIMB", "lower_limb"),
    ("LSPINE", "spine"),
    ("LSSPINE", "spine"),
    ("LUNG", "chest"),
    ("Left Breast", "breast"),
    ("MEDIASTINUM", "chest"),
    ("NECK", "head_neck"),
    ("NECKCHEST", "chest"),
    ("NECKCHESTABDOMEN", "whole_body"),
    ("NECKCHESTABDPELV", "whole_body"),
    ("OPTICCANAL", "head_neck"),
    ("OTHER", "unknown"),
    ("OUTSIDE FIL", "unknown"),
    ("OVARY", "pelvis"),
    ("PANCREAS", "abdomen"),
    ("PELVIS", "pelvis"),
    ("PHANTOM", "phantom"),
    ("PROSTATE", "pelvis"),
    ("Phantom", "phantom"),
    ("RECTUM", "pelvis"),
    ("Right Breast", "breast"),
    ("SEG", "unknown"),
    ("SHOULDER", "upper_limb"),
    ("SKULL", "head_neck"),
    ("SPINE", "spine"),
    ("SSPINE", "spine"),
    ("STOMACH", "abdomen"),
    ("TH CT CHEST WO C", "chest"),
    ("THIGH", "lower_limb"),
    ("THORAX", "chest"),
    ("THYROID", "head_neck"),
    ("TLSPINE", "spine"),
    ("TSPINE", "spine"),
    ("UNKNOWN", "unknown"),
    ("UTERUS", "pelvis"),
    ("WHOLEBODY", "whole_body"),
    ("WO INTER", "unknown"),
]

# Values that honestly carry no region (ambiguous or placeholder text).
EXPECTED_UNKNOWN = {"EXTREMITY", "FUSION", "OTHER", "OUTSIDE FIL", "SEG", "UNKNOWN", "WO INTER"}

REAL_CORPUS_VALUES = [
    ("PROSTATE", "pelvis"),
    ("BRAIN", "head_neck"),
    ("Brain", "head_neck"),
    ("CHEST", "chest"),
    ("ABDOMEN", "abdomen"),
    ("WHOLE BODY", "whole_body"),
    ("HEAD", "head_neck"),
    ("HEART", "chest"),
    ("BREAST", "breast"),
    ("HIP", "pelvis"),
    ("CSPINE", "spine"),
    ("NECK", "head_neck"),
    ("PANCREAS", "abdomen"),
    ("HAND", "upper_limb"),
    ("KNEE", "lower_limb"),
]


@pytest.fixture(scope="module")
def body_part_map() -> BodyPartMap:
    return BodyPartMap.default()


@pytest.mark.parametrize(("raw", "region"), IDC_VALUES + REAL_CORPUS_VALUES)
def test_every_known_value_maps_to_its_region(body_part_map: BodyPartMap, raw: str, region: str) -> None:
    assert body_part_map.normalise(raw) == region


def test_table_lists_unknown_only_for_placeholder_values() -> None:
    assert {raw for raw, region in IDC_VALUES if region == UNKNOWN} == EXPECTED_UNKNOWN
    assert all(region in REGIONS for _, region in IDC_VALUES)


def test_idc_index_coverage_is_at_least_95_percent(body_part_map: BodyPartMap) -> None:
    pytest.importorskip("idc_index")
    from modality.labels.body_parts import idc_body_part_counts

    counts = idc_body_part_counts(
        modalities=("CT", "MR", "PT", "CR", "DX", "MG", "NM", "US", "XA", "RF", "OT")
    )
    table = dict(IDC_VALUES)
    for raw, _ in counts:
        if raw and raw in table:
            assert body_part_map.normalise(raw) == table[raw], raw
        elif raw:
            # A value new in a later index release: it must still land on a defined region.
            assert body_part_map.normalise(raw) in REGIONS
    report = coverage(idc_body_part_counts(), body_part_map)
    print(f"IDC image-series body-part coverage: {report['coverage']:.4f} of {report['series_with_value']}")
    assert report["coverage"] >= 0.95
    assert report["series_with_value"] > 100_000


def test_coverage_ignores_empty_values_and_names_the_unmapped(body_part_map: BodyPartMap) -> None:
    report = coverage([("CHEST", 90), ("EXTREMITY", 10), (None, 500), ("  ", 7)], body_part_map)
    assert report["coverage"] == pytest.approx(0.9)
    assert report["series_with_value"] == 100
    assert report["unmapped"] == {"EXTREMITY": 10}
