"""Sources that list the files of a local folder as :class:`~modality.records.InputItem` objects.

Three layouts cover most public collections:

* :class:`DicomFolderSource` — a tree of DICOM files (any extension, or none: many archives store
  ``IM000001`` style names), labelled by each file's own Modality tag unless the config vouches for a class.
* :class:`ImageFolderSource` — PNG/JPEG/PGM radiographs that carry no tags: the class comes from the dataset
  config (one label for the folder, or one per sub-folder) or from a metadata CSV.
* :class:`VolumeSource` — NIfTI (``.nii``/``.nii.gz``) and ``.npy`` stacks, one sample per slice along an axis.

Listing is sorted so the same folder always yields the same items in the same order (determinism starts
here), and nothing is opened beyond what is needed to recognise the file type.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from pathlib import Path

from modality.records import InputItem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".pnm")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")
#: Files never worth offering as DICOM: checksums, docs, archives and the like found in sample repositories.
NON_DICOM_SUFFIXES = (
    ".txt",
    ".md",
    ".json",
    ".csv",
    ".xml",
    ".html",
    ".py",
    ".zip",
    ".gz",
    ".tar",
    ".md5",
    ".sha1",
    ".yaml",
    ".yml",
    *IMAGE_SUFFIXES,
    ".nii",
    ".npy",
)


def iter_files(root: str | Path) -> Iterator[Path]:
    """Every regular file under ``root`` in a stable (sorted, depth-first) order, hidden files skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder does not exist: {root}")
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
            yield path


def has_dicom_magic(path: Path) -> bool:
    """True when the file has the ``DICM`` marker after the 128-byte preamble.

    Files without a preamble exist (the standard's older "raw" form), so callers that must not miss them
    use the suffix rule instead; this check only helps skip obvious non-DICOM files in mixed folders.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


class DicomFolderSource:
    """All DICOM files below ``root`` as one dataset.

    ``label`` forces a class for every file (rarely right: most folders mix modalities), otherwise the
    reader's Modality tag decides. Files with an obviously non-DICOM suffix are not offered; everything else
    is, so preamble-less files still reach the reader, which rejects non-DICOM content with a reason.
    """

    def __init__(self, root: str | Path, dataset: str, label: str | None = None) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.label = label

    def items(self) -> list[InputItem]:
        return [
            InputItem(path=str(path), dataset=self.dataset, kind="dicom", label=self.label)
            for path in iter_files(self.root)
            if _suffix(path) not in NON_DICOM_SUFFIXES
        ]


def read_label_csv(csv_path: str | Path, path_column: str = "path") -> dict[str, dict[str, str]]:
    """Rows of a metadata CSV keyed by the file path relative to the image folder (forward slashes)."""
    with Path(csv_path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or path_column not in reader.fieldnames:
            raise ValueError(f"{csv_path}: metadata CSV needs a {path_column!r} column")
        return {row[path_column].replace("\\", "/"): row for row in reader}


class ImageFolderSource:
    """PNG/JPEG/PGM files below ``root``; their class comes from config, never from pixels.

    Exactly one of ``label`` (whole folder), ``labels`` (first-level sub-folder name -> class) or
    ``metadata_csv`` (columns ``path`` relative to ``root``, ``class``, optional ``modality``,
    ``body_part``, ``patient_id``) must say what each image is. Files the CSV or sub-folder map does not
    cover are still offered with ``label=None`` so prepare records them as rejects instead of dropping them.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        label: str | None = None,
        labels: Mapping[str, str] | None = None,
        metadata_csv: str | Path | None = None,
        modality: str | None = None,
        body_part: str | None = None,
    ) -> None:
        given = [x is not None for x in (label, labels, metadata_csv)]
        if sum(given) != 1:
            raise ValueError(
                f"ImageFolderSource({dataset}): give exactly one of label, labels or metadata_csv, "
                "because image files carry no tags to label them"
            )
        self.root = Path(root)
        self.dataset = dataset
        self.label = label
        self.labels = dict(labels) if labels is not None else None
        self.metadata_csv = metadata_csv
        self.modality = modality
        self.body_part = body_part

    def items(self) -> list[InputItem]:
        rows = read_label_csv(self.metadata_csv) if self.metadata_csv is not None else {}
        out = []
        for path in iter_files(self.root):
            if _suffix(path) not in IMAGE_SUFFIXES:
                continue
            rel = path.relative_to(self.root).as_posix()
            row = rows.get(rel, {})
            label = self._label_for(rel, row)
            out.append(
                InputItem(
                    path=str(path),
                    dataset=self.dataset,
                    kind="image",
                    label=label,
                    modality=row.get("modality") or self.modality or label,
                    body_part=row.get("body_part") or self.body_part,
                    # Unknown patient: the file itself, namespaced so equal stems in two datasets are not
                    # mistaken for one patient by the cross-split guard.
                    patient_id=row.get("patient_id") or f"{self.dataset}:{rel}",
                )
            )
        return out

    def _label_for(self, rel: str, row: Mapping[str, str]) -> str | None:
        if self.label is not None:
            return self.label
        if self.labels is not None:
            return self.labels.get(rel.split("/", 1)[0])
        return row.get("class") or None


class VolumeSource:
    """NIfTI and ``.npy`` volumes below ``root``, one dataset, one class, slices along ``slice_axis``.

    Volumes carry no modality tag, so ``label`` is required; each file is treated as one patient and one
    series unless the caller knows better (patient ids default to the file stem so the patient guard and the
    even-across-patients sampling still have something to group by).
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        label: str,
        slice_axis: int = 2,
        modality: str | None = None,
        body_part: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.label = label
        self.slice_axis = slice_axis
        self.modality = modality
        self.body_part = body_part

    def items(self) -> list[InputItem]:
        out = []
        for path in iter_files(self.root):
            suffix = _suffix(path)
            if suffix not in VOLUME_SUFFIXES:
                continue
            stem = path.name[: -len(suffix)]
            out.append(
                InputItem(
                    path=str(path),
                    dataset=self.dataset,
                    kind="npy" if suffix == ".npy" else "nifti",
                    label=self.label,
                    modality=self.modality or self.label,
                    body_part=self.body_part,
                    patient_id=f"{self.dataset}:{stem}",
                    series_uid=f"{self.dataset}:{stem}",
                    slice_axis=self.slice_axis,
                )
            )
        return out
