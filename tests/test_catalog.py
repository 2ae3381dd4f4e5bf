"""The IDC catalog: which series count as images, and the per collection x class table (fake and real index)."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from modality.labels import BodyPartMap, ClassMap
from modality.sources.idc.catalog import (
    CATALOG_COLUMNS,
    SERIES_COLUMNS,
    format_catalog_table,
    read_index,
    select_image_series,
    summarise_catalog,
)


def fake_index() -> pd.DataFrame:
    """A few rows shaped like the real index: images, an analysis result, non-image objects, raw data."""
    rows = [
        # collection, analysis, patient, series, modality, sop class, body part, instances, MB
        ("coll_a", None, "p1", "1.1", "CT", "CT Image Storage", "CHEST", 100, 50.0),
        ("coll_a", None, "p1", "1.2", "CT", "CT Image Storage", "ABDOMEN", 80, 40.0),
        ("coll_a", None, "p2", "1.3", "MR", "MR Image Storage", "BRAIN", 30, 5.0),
        ("coll_a", None, "p2", "1.4", "SEG", "Segmentation Storage", "BRAIN", 1, 1.0),
        ("coll_a", None, "p2", "1.5", "MR", "Raw Data Storage", "BRAIN", 1, 0.1),
        ("coll_a", "seg_result", "p1", "1.6", "CT", "CT Image Storage", "CHEST", 100, 50.0),
        ("coll_b", None, "q1", "2.1", "CR", "Computed Radiography Image Storage", "CHEST", 1, 8.0),
        ("coll_b", None, "q2", "2.2", "DX", "Digital X-Ray Image Storage - For Presentation", "", 1, 8.0),
        ("coll_b", None, "q2", "2.3", "SR", "Comprehensive SR Storage", None, 1, 0.01),
        ("coll_b", None, "q3", "2.4", "CT", "Secondary Capture Image Storage", "CHEST", 1, 0.5),
        (
            "coll_b",
            None,
            "q3",
            "2.5",
            "PT",
            "Positron Emission Tomography Image Storage",
            "WHOLEBODY",
            200,
            20.0,
        ),
    ]
    frame = pd.DataFrame(
        rows,
        columns=[
            "collection_id",
            "analysis_result_id",
            "PatientID",
            "SeriesInstanceUID",
            "Modality",
            "sop_class_name",
            "BodyPartExamined",
            "instanceCount",
            "series_size_MB",
        ],
    )
    for column in set(SERIES_COLUMNS) - set(frame.columns):
        frame[column] = "x"
    return frame[list(SERIES_COLUMNS)]


@pytest.fixture(scope="module")
def maps() -> tuple[ClassMap, BodyPartMap]:
    return ClassMap.default(), BodyPartMap.default()


def test_select_image_series_drops_analysis_results_and_non_images(maps) -> None:
    class_map, body_parts = maps
    series = select_image_series(fake_index(), class_map.class_of, body_parts.normalise)
    assert sorted(series["SeriesInstanceUID"]) == ["1.1", "1.2", "1.3", "2.1", "2.2", "2.5"]
    by_uid = series.set_index("SeriesInstanceUID")
    assert by_uid.loc["2.1", "class"] == "XR" and by_uid.loc["2.2", "class"] == "XR"
    assert by_uid.loc["1.1", "body_part"] == "chest"
    assert by_uid.loc["2.2", "body_part"] == "unknown"  # empty BodyPartExamined
    assert by_uid.loc["2.5", "body_part"] == body_parts.normalise("WHOLEBODY")


def test_summarise_catalog_counts_per_collection_and_class(maps) -> None:
    class_map, body_parts = maps
    table = summarise_catalog(select_image_series(fake_index(), class_map.class_of, body_parts.normalise))
    assert tuple(table.columns) == CATALOG_COLUMNS
    ct = table[(table["collection_id"] == "coll_a") & (table["class"] == "CT")].iloc[0]
    assert (ct["series"], ct["images"], ct["patients"], ct["size_mb"]) == (2, 180, 1, 90.0)
    assert set(ct["body_parts"].split(";")) == {"chest", "abdomen"}
    xr = table[(table["collection_id"] == "coll_b") & (table["class"] == "XR")].iloc[0]
    assert (xr["series"], xr["images"], xr["patients"]) == (2, 2, 2)
    assert xr["body_parts"] == "chest"  # unknown is not listed beside a known region
    text = format_catalog_table(table)
    assert "coll_a" in text and "Totals per class" in text


def test_index_without_required_columns_is_a_clear_error(maps) -> None:
    class_map, body_parts = maps
    with pytest.raises(ValueError, match="PatientID"):
        select_image_series(
            fake_index().drop(columns=["PatientID"]), class_map.class_of, body_parts.normalise
        )


def test_read_index_filters_in_duckdb(tmp_path) -> None:
    pytest.importorskip("duckdb")
    path = tmp_path / "index.parquet"
    fake_index().to_parquet(path)
    frame = read_index(path, codes=["CT", "MR"])
    assert set(frame["Modality"]) == {"CT", "MR"}
    assert frame["analysis_result_id"].isna().all()
    with pytest.raises(FileNotFoundError):
        read_index(tmp_path / "missing.parquet")


def test_catalog_cli_on_the_real_index(tmp_path) -> None:
    pytest.importorskip("idc_index_data")
    out = tmp_path / "catalog.csv"
    result = subprocess.run(
        [sys.executable, "-m", "modality.commands.idc_catalog", f"out={out}", "max_rows=5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Totals per class" in result.stdout
    table = pd.read_csv(out)
    assert set(table["class"]) == {"CT", "MR", "PT", "XR"}
    assert table["collection_id"].nunique() > 100
    totals = table.groupby("class")["images"].sum()
    assert totals["CT"] > 1_000_000 and totals["PT"] > 100_000


def test_collection_metadata_flags_animals_and_phantoms() -> None:
    from modality.sources.idc.catalog import non_human_collections, read_collections

    frame = pd.DataFrame(
        {
            "collection_id": ["human_ct", "mice", "phantom_ct", "xenograft"],
            "species": ["Human", "Mouse", "Human", "Human, Mouse"],
            "cancer_types": ["Lung Cancer", "Sarcoma", "Phantom", "Various"],
        }
    )
    assert non_human_collections(frame) == {
        "mice": "species Mouse",
        "phantom_ct": "phantom",
        "xenograft": "species Human, Mouse",
    }
    pytest.importorskip("idc_index_data")
    flagged = non_human_collections(read_collections())
    assert {"catch", "mri_dir", "icdc_glioma", "qin_pet_phantom"} <= set(flagged)
    assert (
        "nlst" not in flagged and "victre" not in flagged
    )  # VICTRE is simulated: excluded by name in configs/idc_plan.yaml
