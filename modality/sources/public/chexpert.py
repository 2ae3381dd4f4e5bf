"""CheXpert (Stanford): chest radiographs as JPEGs listed in ``train.csv`` / ``valid.csv``.

Layout: ``CheXpert-v1.0[-small]/{train.csv,valid.csv,train/,valid/}``; each CSV's ``Path`` column reads
``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``, i.e. relative to the folder *above* the
root. Each CSV becomes one dataset (``chexpert_train``, ``chexpert_valid``): the publisher's patient-disjoint
split, so prepare can put them in different splits.
"""

from __future__ import annotations

import re
from pathlib import Path

from modality.records import InputItem
from modality.sources.public import RADIOGRAPH_CODE, missing_file, read_csv_rows, require_directory

_PATIENT = re.compile(r"(patient\d+)")
_STUDY = re.compile(r"(study\d+)")


def resolve_listed_path(root: Path, listed: str) -> Path:
    """Where a CSV ``Path`` value lives: beside the root's parent (as published) or inside the root."""
    relative = Path(listed)
    for candidate in (root.parent / relative, root / relative, root / Path(*relative.parts[1:])):
        if candidate.is_file():
            return candidate
    return root.parent / relative


class CheXpertSource:
    """One InputItem per listed JPEG: class XR, body part chest, patient ``chexpert:patientNNNNN``."""

    def __init__(
        self,
        root: str | Path,
        csv_files: tuple[str, ...] = ("train.csv", "valid.csv"),
        dataset: str = "chexpert",
    ) -> None:
        self.root = Path(root)
        self.csv_files = tuple(csv_files)
        self.dataset = dataset

    def items(self) -> list[InputItem]:
        root = require_directory(self.root, "CheXpert root (the folder holding train.csv)")
        items = []
        for name in self.csv_files:
            table = root / name
            if not table.is_file():
                raise FileNotFoundError(f"CheXpert table not found: {table}")
            dataset = f"{self.dataset}_{Path(name).stem}"
            for row in read_csv_rows(table, ("Path",)):
                listed = row["Path"].strip()
                patient = _PATIENT.search(listed)
                study = _STUDY.search(listed)
                if patient is None:
                    raise ValueError(f"{table}: no patientNNNNN in Path {listed!r}")
                path = resolve_listed_path(root, listed)
                extra: dict[str, object] = {
                    "view": row.get("Frontal/Lateral", ""),
                    "projection": row.get("AP/PA", ""),
                }
                if not path.is_file():
                    extra.update(missing_file(path, table))
                patient_id = f"chexpert:{patient.group(1)}"
                items.append(
                    InputItem(
                        path=str(path),
                        dataset=dataset,
                        kind="image",
                        label="XR",
                        modality=RADIOGRAPH_CODE,
                        body_part="CHEST",
                        patient_id=patient_id,
                        study_uid=f"{patient_id}/{study.group(1)}" if study else None,
                        extra=extra,
                    )
                )
        return sorted(items, key=lambda item: (item.dataset, item.path))
