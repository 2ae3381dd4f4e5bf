"""Class map and body-part map: loading, lookup rules, and the source-label precedence."""

from __future__ import annotations

import pytest

from modality.labels import BodyPartMap, ClassMap, resolve_class
from modality.labels.body_parts import body_part_key


def test_default_class_map_pools_radiographs_and_excludes_other_codes() -> None:
    class_map = ClassMap.default()
    assert class_map.classes == ("CT", "MR", "PT", "XR")
    assert [class_map.class_of(c) for c in ("CT", "MR", "PT", "CR", "DX", "MG")] == [
        "CT",
        "MR",
        "PT",
        "XR",
        "XR",
        "XR",
    ]
    for code in ("US", "NM", "OT", "SEG", "SR", "", None):
        assert class_map.class_of(code) is None
    assert class_map.class_of(" ct ") == "CT"  # old headers pad and lower-case codes
    assert [class_map.index(c) for c in class_map.classes] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown class"):
        class_map.index("US")


def test_class_map_from_yaml_and_validation(tmp_path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text("classes: [CT, NM]\ncodes: {CT: CT, NM: NM, PT: NM}\n")
    class_map = ClassMap.from_yaml(path)
    assert class_map.class_of("PT") == "NM" and class_map.class_of("MR") is None
    assert class_map.to_dict() == {"classes": ["CT", "NM"], "codes": {"CT": "CT", "NM": "NM", "PT": "NM"}}
    with pytest.raises(ValueError, match="not in `classes`"):
        ClassMap.from_config({"classes": ["CT"], "codes": {"MR": "MR"}})
    with pytest.raises(ValueError, match="unique"):
        ClassMap.from_config({"classes": ["CT", "CT"], "codes": {}})


def test_resolve_class_prefers_the_source_label() -> None:
    class_map = ClassMap.default()
    assert resolve_class("CT", None, class_map) == "CT"
    assert resolve_class("DX", None, class_map) == "XR"
    assert resolve_class("US", None, class_map) is None
    assert resolve_class(None, None, class_map) is None
    assert resolve_class("OT", "XR", class_map) == "XR"  # manifest vouches for a secondary capture
    assert resolve_class(None, "CR", class_map) == "XR"  # a label given as a code goes through the map
    assert resolve_class("CT", "other", class_map) is None  # the manifest excludes it
    assert resolve_class("CT", "  ", class_map) == "CT"  # blank label = no label


def test_body_part_keys_ignore_case_space_and_punctuation() -> None:
    assert body_part_key("Left Breast") == body_part_key("LEFT_BREAST") == "LEFTBREAST"
    body_parts = BodyPartMap.default()
    assert body_parts.normalise("whole body") == body_parts.normalise("WHOLE_BODY") == "whole_body"
    assert body_parts.normalise("c-spine") == "spine"
    assert body_parts.normalise(None) == body_parts.normalise("") == "unknown"
    assert body_parts.normalise("XYZZY") == "unknown"


def test_body_part_keywords_catch_free_text() -> None:
    body_parts = BodyPartMap.default()
    assert body_parts.normalise("CT CHEST W CONTRAST") == "chest"
    assert body_parts.normalise("MRI BRAIN WWO") == "head_neck"
    assert body_parts.normalise("pelvic floor") == "pelvis"


def test_body_part_map_rejects_conflicts_and_unknown_regions() -> None:
    with pytest.raises(ValueError, match="listed under"):
        BodyPartMap.from_config({"aliases": {"chest": ["THORAX"], "abdomen": ["thorax"]}})
    with pytest.raises(ValueError, match="regions not in"):
        BodyPartMap.from_config({"aliases": {"torso": ["TRUNK"]}})
    exported = BodyPartMap.default().to_dict()
    assert exported["regions"][-1] == "unknown"
    assert "LEFTBREAST" in exported["aliases"]["breast"]


def test_maps_round_trip_through_summary_json_plain_types() -> None:
    import json

    body_parts = BodyPartMap.default()
    restored = BodyPartMap.from_config(json.loads(json.dumps(body_parts.to_dict())))
    for raw in ("Left Breast", "CHESTABDPELVIS", "TH CT CHEST WO C", "EXTREMITY", "skull"):
        assert restored.normalise(raw) == body_parts.normalise(raw)
    class_map = ClassMap.default()
    assert ClassMap.from_config(json.loads(json.dumps(class_map.to_dict()))) == class_map
