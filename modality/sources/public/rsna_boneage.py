"""RSNA Pediatric Bone Age challenge: hand radiographs as PNGs plus a CSV per set.

Layout: ``<root>/boneage-training-dataset.csv`` (``id,boneage,male``) with the images in
``<root>/boneage-training-dataset/<id>.png``; the test set likewise (``boneage-test-dataset.csv`` with
``Case ID,Sex``). One image per child, so the case id is the patient; each CSV becomes a dataset.
"""

from __future__ import annotations

from pathlib import Path

from modality.records import InputItem
from modality.sources.public import RADIOGRAPH_CODE, missing_file, read_csv_rows, require_directory

ID_COLUMNS = ("id", "Case ID")


class RSNABoneAgeSource:
    """One InputItem per CSV row: class XR, body part hand (upper limb), patient ``rsna_boneage:<set>:<id>``."""

    def __init__(
        self,
        root: str | Path,
        csv_files: tuple[str, ...] = ("boneage-training-dataset.csv",),
        dataset: str = "rsna_boneage",
    ) -> None:
        self.root = Path(root)
        self.csv_files = tuple(csv_files)
        self.dataset = dataset

    def items(self) -> list[InputItem]:
        root = require_directory(self.root, "RSNA Bone Age root")
        items = []
        for name in self.csv_files:
            table = root / name
            if not table.is_file():
                raise FileNotFoundError(f"RSNA Bone Age table not found: {table}")
            rows = read_csv_rows(table, ())
            id_column = next((c for c in ID_COLUMNS if rows and c in rows[0]), None)
            if rows and id_column is None:
                raise ValueError(f"{table}: no id column (one of {list(ID_COLUMNS)})")
            image_dir = root / table.stem
            subset = table.stem.removeprefix("boneage-").removesuffix("-dataset")
            for row in rows:
                case = row[id_column].strip()
                path = image_dir / f"{case}.png"
                extra: dict[str, object] = {
                    "boneage_months": row.get("boneage"),
                    "male": row.get("male", row.get("Sex")),
                }
                if not path.is_file():
                    extra.update(missing_file(path, table))
                items.append(
                    InputItem(
                        path=str(path),
                        dataset=f"{self.dataset}_{subset}",
                        kind="image",
                        label="XR",
                        modality=RADIOGRAPH_CODE,
                        body_part="HAND",
                        patient_id=f"rsna_boneage:{subset}:{case}",
                        extra=extra,
                    )
                )
        return sorted(items, key=lambda item: (item.dataset, item.path))
