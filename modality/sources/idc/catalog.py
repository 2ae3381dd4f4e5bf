"""The IDC/TCIA catalog: which image series the bundled idc-index offers, per collection and class.

NCI Imaging Data Commons mirrors TCIA's radiology collections, and the ``idc-index-data`` package ships its
series-level index (about one million series) as a parquet file, so the whole catalog is computed offline.
Reading that parquet with DuckDB and projecting only the columns we use takes about two seconds, against
roughly twenty for the same query through ``IDCClient().sql_query`` over the in-memory pandas copy; the
planner's one-minute budget depends on it.

Two filters decide what counts as an *image series*:

- ``analysis_result_id`` is null: analysis results (segmentations, derived maps, annotations) are derived
  from the original images and would duplicate patients and pixels;
- the series' ``Modality`` code maps to a class through the class map (SEG, RTSTRUCT, SR, US, SM... do not),
  and its SOP class is not one of ``exclude_sop_classes`` (raw data has no pixels; secondary captures under a
  CT/MR code are mostly dose reports and screenshots).

``images`` counts DICOM instances (``instanceCount``): for multi-frame objects (breast tomosynthesis,
enhanced MR) one instance holds many frames, so the number of 2-D slices is larger than the count shown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pandas as pd

#: Index columns the catalog, the planner and the downloader read.
SERIES_COLUMNS = (
    "collection_id",
    "analysis_result_id",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "sop_class_name",
    "BodyPartExamined",
    "instanceCount",
    "series_size_MB",
    "aws_bucket",
    "crdc_series_uuid",
    "series_aws_url",
)

#: SOP classes that carry a class-map Modality code but no usable image.
DEFAULT_EXCLUDED_SOP_CLASSES = ("Raw Data Storage", "Secondary Capture Image Storage")

#: Catalog table columns, in display order.
CATALOG_COLUMNS = ("collection_id", "class", "series", "images", "patients", "body_parts", "size_mb")


def bundled_index_path() -> Path:
    """Path of the series-level parquet index that ``idc-index-data`` installs."""
    try:
        import idc_index_data
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the IDC catalog needs the idc-index package: pip install 'modality[catalog]'"
        ) from error
    return Path(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)


def read_index(parquet_path: str | Path | None = None, codes: Iterable[str] | None = None) -> pd.DataFrame:
    """Series rows of the IDC index, restricted to non-analysis series with a Modality in ``codes``.

    Filtering in DuckDB before pandas sees the rows keeps memory and time low (the full index has about
    1 M rows; the image series about 470 k).
    """
    import duckdb

    path = Path(parquet_path) if parquet_path is not None else bundled_index_path()
    if not path.is_file():
        raise FileNotFoundError(f"IDC index parquet not found: {path}")
    columns = ", ".join(SERIES_COLUMNS)
    query = f"SELECT {columns} FROM read_parquet(?) WHERE analysis_result_id IS NULL"
    params: list[object] = [str(path)]
    if codes is not None:
        code_list = sorted(set(codes))
        if not code_list:
            raise ValueError("no modality codes to select: the class map maps no code to a class")
        query += f" AND Modality IN ({', '.join('?' for _ in code_list)})"
        params.extend(code_list)
    with duckdb.connect() as connection:
        return connection.execute(query, params).df()


def read_collections(parquet_path: str | Path | None = None) -> pd.DataFrame:
    """Collection metadata (``collection_id, species, cancer_types``) from the ``collections_index`` bundled
    beside the series index; an empty frame when this idc-index-data version lacks it."""
    import duckdb

    series_path = Path(parquet_path) if parquet_path is not None else bundled_index_path()
    path = series_path.with_name("collections_index.parquet")
    if not path.is_file():
        return pd.DataFrame(columns=["collection_id", "species", "cancer_types"])
    with duckdb.connect() as connection:
        return connection.execute(
            "SELECT collection_id, species, cancer_types FROM read_parquet(?) ORDER BY collection_id",
            [str(path)],
        ).df()


def non_human_collections(collections: pd.DataFrame) -> dict[str, str]:
    """Collections whose metadata says they are not (only) human patients: animals, phantoms.

    Returns collection -> reason. Phantom collections are often filed under species "Human" with cancer type
    "Phantom", so both columns are read.
    """
    reasons = {}
    for row in collections.itertuples(index=False):
        species = str(row.species or "").strip()
        cancer_types = str(row.cancer_types or "").strip()
        if species and species != "Human":
            reasons[str(row.collection_id)] = f"species {species}"
        elif cancer_types == "Phantom":
            reasons[str(row.collection_id)] = "phantom"
    return reasons


def normalise_column(values: pd.Series, normalise: Callable[[str], str]) -> pd.Series:
    """Apply ``normalise`` once per distinct raw value (a few hundred) instead of once per row (a million)."""
    raw = values.fillna("").astype(str)
    lookup = {value: normalise(value) for value in raw.unique()}
    return raw.map(lookup)


def select_image_series(
    index: pd.DataFrame,
    class_of: Callable[[str], str | None],
    body_part_of: Callable[[str], str],
    exclude_sop_classes: Sequence[str] = DEFAULT_EXCLUDED_SOP_CLASSES,
) -> pd.DataFrame:
    """Image series of ``index`` with their ``class`` and normalised ``body_part`` columns added.

    Pure function over a DataFrame shaped like the IDC index, so tests can hand it a tiny fake index.
    Analysis results, codes outside the class map and excluded SOP classes are dropped.
    """
    missing = {"collection_id", "PatientID", "SeriesInstanceUID", "Modality", "instanceCount"} - set(
        index.columns
    )
    if missing:
        raise ValueError(f"index lacks required columns: {sorted(missing)}")
    series = index
    if "analysis_result_id" in series.columns:
        series = series[series["analysis_result_id"].isna()]
    codes = series["Modality"].fillna("").astype(str)
    class_lookup = {code: class_of(code) for code in codes.unique()}
    classes = codes.map(class_lookup)
    keep = classes.notna()
    if "sop_class_name" in series.columns and exclude_sop_classes:
        keep &= ~series["sop_class_name"].isin(list(exclude_sop_classes))
    series = series[keep].copy()
    series["class"] = classes[keep].astype(str)
    raw_parts = (
        series["BodyPartExamined"] if "BodyPartExamined" in series.columns else pd.Series("", series.index)
    )
    series["body_part"] = normalise_column(raw_parts, body_part_of)
    series["instanceCount"] = series["instanceCount"].fillna(0).astype("int64")
    # a few hundred distinct values over ~500k rows: categoricals make the planner's group-bys and joins fast
    for column in ("collection_id", "class", "body_part", "Modality"):
        series[column] = series[column].astype(str).astype("category")
    if "series_size_MB" not in series.columns:
        series["series_size_MB"] = 0.0
    return series.reset_index(drop=True)


def _join_body_parts(parts: pd.Series) -> str:
    """Known regions present, most series first; ``unknown`` is shown only when nothing else is known."""
    counts = parts.value_counts()
    counts = counts[counts > 0]  # a categorical column lists every category, present or not
    known = [str(part) for part in counts.index if part != "unknown"]
    return ";".join(known) if known else ";".join(str(part) for part in counts.index)


def summarise_catalog(series: pd.DataFrame) -> pd.DataFrame:
    """One row per collection x class: series, images, patients, body parts and size (MB)."""
    grouped = series.groupby(["collection_id", "class"], sort=True, observed=True)
    table = grouped.agg(
        series=("SeriesInstanceUID", "size"),
        images=("instanceCount", "sum"),
        patients=("PatientID", "nunique"),
        body_parts=("body_part", _join_body_parts),
        size_mb=("series_size_MB", "sum"),
    ).reset_index()
    table["size_mb"] = table["size_mb"].round(1)
    return table[list(CATALOG_COLUMNS)]


def format_catalog_table(table: pd.DataFrame, max_rows: int | None = None) -> str:
    """A readable text table with per-class totals underneath."""
    shown = table if max_rows is None else table.head(max_rows)
    body = shown.to_string(index=False, max_colwidth=48)
    totals = table.groupby("class").agg(
        collections=("collection_id", "nunique"),
        series=("series", "sum"),
        images=("images", "sum"),
        patients=("patients", "sum"),
        size_gb=("size_mb", lambda mb: round(float(mb.sum()) / 1024, 1)),
    )
    lines = [body]
    if max_rows is not None and len(table) > max_rows:
        lines.append(f"... {len(table) - max_rows} more rows in the CSV")
    lines += ["", "Totals per class (patients summed over collections):", totals.to_string()]
    return "\n".join(lines)
