"""MRNet (Stanford): knee MR exams as npy volumes, one per plane.

Layout: ``MRNet-v1.0/{train,valid}/{axial,coronal,sagittal}/NNNN.npy``, each an array of shape
(slices, 256, 256) in uint8, so slices run along axis 0 and every slice is one sample. The three planes of
an exam share patient and study; each plane is its own series. The publisher's train/valid split (disjoint
exams) becomes the datasets ``mrnet_train`` and ``mrnet_valid``.
"""

from __future__ import annotations

import re
from pathlib import Path

from modality.records import InputItem
from modality.sources.public import require_directory

PLANES = ("axial", "coronal", "sagittal")
_EXAM = re.compile(r"^(\d+)\.npy$")


class MRNetSource:
    """One InputItem per volume: class MR, body part knee, slices along axis 0, patient ``mrnet:NNNN``."""

    def __init__(
        self, root: str | Path, splits: tuple[str, ...] = ("train", "valid"), dataset: str = "mrnet"
    ) -> None:
        self.root = Path(root)
        self.splits = tuple(splits)
        self.dataset = dataset

    def items(self) -> list[InputItem]:
        root = require_directory(self.root, "MRNet root (MRNet-v1.0)")
        items = []
        for split in self.splits:
            for plane in PLANES:
                plane_dir = require_directory(root / split / plane, f"MRNet folder {split}/{plane}")
                for path in sorted(plane_dir.iterdir()):
                    exam = _EXAM.match(path.name)
                    if exam is None:
                        raise ValueError(f"unexpected file in MRNet layout: {path} (expected NNNN.npy)")
                    patient_id = f"mrnet:{exam.group(1)}"
                    items.append(
                        InputItem(
                            path=str(path),
                            dataset=f"{self.dataset}_{split}",
                            kind="npy",
                            label="MR",
                            modality="MR",
                            body_part="KNEE",
                            patient_id=patient_id,
                            study_uid=patient_id,
                            series_uid=f"{patient_id}/{plane}",
                            slice_axis=0,
                            extra={"plane": plane},
                        )
                    )
        return items
