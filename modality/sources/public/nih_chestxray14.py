"""NIH ChestX-ray14: 112,120 frontal chest radiographs as PNGs plus ``Data_Entry_2017.csv``.

Layout: ``<root>/Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``; columns ``Image Index``,
``Patient ID``, ``View Position``...) and the PNGs in ``images/`` or the archive folders ``images_001/images/``.
When the publisher's ``train_val_list.txt`` / ``test_list.txt`` are present they split the images into the
patient-disjoint datasets ``nih_chestxray14_train_val`` and ``nih_chestxray14_test``.
"""

from __future__ import annotations

from pathlib import Path

from modality.records import InputItem
from modality.sources.public import RADIOGRAPH_CODE, missing_file, read_csv_rows, require_directory

ENTRY_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
SPLIT_LISTS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}


def _official_split(root: Path) -> dict[str, str]:
    split_of: dict[str, str] = {}
    for split, name in SPLIT_LISTS.items():
        path = root / name
        if path.is_file():
            for line in path.read_text(encoding="utf-8").split():
                split_of[line.strip()] = split
    return split_of


class NIHChestXray14Source:
    """One InputItem per CSV row: class XR, body part chest, patient ``nih_cxr14:<Patient ID>``."""

    def __init__(self, root: str | Path, dataset: str = "nih_chestxray14") -> None:
        self.root = Path(root)
        self.dataset = dataset

    def items(self) -> list[InputItem]:
        root = require_directory(self.root, "NIH ChestX-ray14 root")
        table = next((root / name for name in ENTRY_FILES if (root / name).is_file()), None)
        if table is None:
            raise FileNotFoundError(f"none of {list(ENTRY_FILES)} in {root}")
        on_disk = {path.name: path for path in root.glob("images*/**/*.png")}
        on_disk.update({path.name: path for path in root.glob("*.png")})
        split_of = _official_split(root)
        items = []
        for row in read_csv_rows(table, ("Image Index", "Patient ID")):
            name = row["Image Index"].strip()
            path = on_disk.get(name, root / "images" / name)
            extra: dict[str, object] = {
                "findings": row.get("Finding Labels", ""),
                "view": row.get("View Position", ""),
            }
            if name not in on_disk:
                extra.update(missing_file(path, table))
            split = split_of.get(name)
            patient_id = f"nih_cxr14:{int(row['Patient ID'].strip()):05d}"
            items.append(
                InputItem(
                    path=str(path),
                    dataset=f"{self.dataset}_{split}" if split_of else self.dataset,
                    kind="image",
                    label="XR",
                    modality=RADIOGRAPH_CODE,
                    body_part="CHEST",
                    patient_id=patient_id,
                    study_uid=f"{patient_id}/{row.get('Follow-up #', '').strip() or '0'}",
                    extra=extra,
                )
            )
        unsplit = sum(1 for item in items if split_of and item.dataset == self.dataset)
        if unsplit:
            raise ValueError(f"{unsplit} images of {table.name} are in neither {list(SPLIT_LISTS.values())}")
        return sorted(items, key=lambda item: (item.dataset, item.path))
