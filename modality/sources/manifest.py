"""A source driven by a ``manifest.csv`` that lists every file with its class: the shared real-data corpus.

The corpus (``../shared/data/real``) mixes DICOM from 20+ repositories with PNG/JPEG radiograph collections and
Analyze 7.5 PET volumes (``kind=volume``, read by nibabel like NIfTI);
its manifest says which class each file is (``CT, MR, PT, XR`` or ``other``), where it came from and
whether a human judged it usable. Each source repository becomes one dataset (``owner/repo`` ->
``owner+repo``), because a repository is the unit that shares scanners, patients and quirks — the unit a
leakage-free split must keep whole.

Rows of class ``other`` get no label, so the file's own Modality tag decides (and the class map mostly
excludes it, with a reason). Labelled rows marked ``usable=0`` (phantoms, animals, screen captures,
deliberately broken files) are offered with ``extra["rejected"]`` set when ``skip_unusable`` is on, so prepare records
them in ``rejects.csv`` with the manifest's note instead of training on them — never a silent drop.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from modality.records import PRE_REJECTED, InputItem

#: Classes a manifest row may vouch for; anything else is left to the DICOM header.
LABELLED_CLASSES = ("CT", "MR", "PT", "XR")

_KIND_BY_MANIFEST = {"dicom": "dicom", "xray": "image", "image": "image", "nifti": "nifti", "npy": "npy"}
#: ``kind=volume`` rows say their format: Analyze 7.5 (``.img`` + ``.hdr``) and NIfTI go through nibabel,
#: MetaImage and NRRD through readers/raw_volume.py, all on the NIfTI path.
_VOLUME_KIND_BY_FORMAT = {
    "analyze": "nifti",
    "img": "nifti",
    "nifti": "nifti",
    "nii": "nifti",
    **dict.fromkeys(("metaimage", "mha", "mhd", "nrrd", "nhdr"), "nifti"),
    "npy": "npy",
}
_MODALITY_CODE = re.compile(r"^[A-Z]{2,4}$")


def dataset_name(source_repo: str) -> str:
    """A repository name as a dataset name: ``OHIF/viewer-testdata-dicomweb`` -> ``OHIF+viewer-testdata-dicomweb``.

    Matches the corpus's own folder naming, and keeps names free of path separators.
    """
    name = source_repo.strip().replace("/", "+")
    if not name:
        raise ValueError("manifest row without source_repo: every file must belong to a dataset")
    return re.sub(r"[^A-Za-z0-9+._-]", "_", name)


def current_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """One row per path: the row describing the file on disk.

    The shared manifest also lists older git-history versions of a few files under the same path (their
    ``note`` starts with "older blob version"); only one file exists on disk, so those rows are dropped
    in favour of the current one (or the first row when none is marked current).
    """
    chosen: dict[str, dict[str, str]] = {}
    for row in rows:
        path = row["path"]
        older = row.get("note", "").startswith("older blob version")
        if path not in chosen or (
            chosen[path].get("note", "").startswith("older blob version") and not older
        ):
            chosen[path] = row
    return list(chosen.values())


class ManifestSource:
    """Files listed in ``root/manifest`` (paths relative to ``root``), one dataset per ``source_repo``.

    ``datasets`` restricts the listing to some datasets (handy for small test pools).
    """

    def __init__(
        self,
        root: str | Path,
        manifest: str = "manifest.csv",
        datasets: list[str] | None = None,
        skip_unusable: bool = True,
    ) -> None:
        self.root = Path(root)
        self.manifest = self.root / manifest
        self.datasets = set(datasets) if datasets is not None else None
        self.skip_unusable = skip_unusable

    def items(self) -> list[InputItem]:
        if not self.manifest.is_file():
            raise FileNotFoundError(f"manifest not found: {self.manifest}")
        with self.manifest.open(newline="", encoding="utf-8") as handle:
            rows = current_rows(list(csv.DictReader(handle)))
        items = [self._item(row) for row in rows]
        if self.datasets is not None:
            unknown = self.datasets - {item.dataset for item in items}
            if unknown:
                raise ValueError(f"{self.manifest}: no files for datasets {sorted(unknown)}")
            items = [item for item in items if item.dataset in self.datasets]
        return sorted(items, key=lambda item: (item.dataset, item.path))

    def _patient_id(self, row: dict[str, str], kind: str) -> str | None:
        """The manifest's id; for tagless image files without one, the file itself (namespaced by dataset).

        Readers fall back to the file stem, and two collections both holding ``1.png`` are not one patient.
        DICOM files keep ``None`` here: their own PatientID tag decides.
        """
        stated = row.get("patient_id", "").strip()
        if stated or kind == "dicom":
            return stated or None
        return f"{dataset_name(row.get('source_repo', ''))}:{row['path']}"

    def _item(self, row: dict[str, str]) -> InputItem:
        stated_kind = row.get("kind", "").strip()
        if stated_kind == "volume":
            kind = _VOLUME_KIND_BY_FORMAT.get(row.get("format", "").strip().lower())
        else:
            kind = _KIND_BY_MANIFEST.get(stated_kind)
        if kind is None:
            raise ValueError(
                f"{self.manifest}: unknown kind {stated_kind!r} (format {row.get('format')!r}) for {row.get('path')}"
            )
        cls = row.get("class", "").strip()
        label = cls if cls in LABELLED_CLASSES else None
        stated = row.get("modality", "").strip()
        extra: dict[str, object] = {"manifest_path": row["path"]}
        # Only labelled rows: an `other` row is left to its header, which names the excluded code.
        if self.skip_unusable and label is not None and row.get("usable", "1").strip() == "0":
            extra[PRE_REJECTED] = {
                "reason": "marked unusable in manifest",
                "detail": row.get("note", "").strip(),
            }
        return InputItem(
            path=str(self.root / row["path"]),
            dataset=dataset_name(row.get("source_repo", "")),
            kind=kind,
            label=label,
            # Image rows state free text ("X-ray / filename prefix CR"); keep only real codes.
            modality=stated if _MODALITY_CODE.match(stated) else label,
            body_part=row.get("body_part", "").strip() or None,
            patient_id=self._patient_id(row, kind),
            series_uid=row.get("series_uid", "").strip() or None,
            extra=extra,
        )
