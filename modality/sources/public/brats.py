"""BraTS 2020: brain MR of glioma patients as NIfTI, four co-registered sequences per case.

Layout: ``MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii``
(``.nii.gz`` accepted). Volumes are 240x240x155 in RAS+, so axial slices run along axis 2. The ``seg`` label
map (and any other file in a case folder) is not an image: it is returned pre-rejected so rejects.csv
accounts for it. Cases include TCGA-GBM/LGG patients also in IDC under other ids: do not pool BraTS with
``tcga_gbm``/``tcga_lgg`` across splits.
"""

from __future__ import annotations

import re
from pathlib import Path

from modality.records import InputItem
from modality.sources.public import PRE_REJECTED, require_directory

SEQUENCES = ("t1", "t1ce", "t2", "flair")
_CASE = re.compile(r"^BraTS20_(Training|Validation)_\d+$")


def sequence_of(path: Path, case: str) -> str | None:
    """``t1``/``t1ce``/``t2``/``flair`` for a case's image file, None for anything else (seg, stray files)."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            sequence = stem.removeprefix(case + "_")
            return sequence if stem != sequence and sequence in SEQUENCES else None
    return None


class BraTS2020Source:
    """One InputItem per sequence volume: class MR, body part head, axial slices, patient ``brats20:<case>``."""

    def __init__(self, root: str | Path, dataset: str = "brats2020") -> None:
        self.root = Path(root)
        self.dataset = dataset

    def items(self) -> list[InputItem]:
        root = require_directory(self.root, "BraTS 2020 root (MICCAI_BraTS2020_TrainingData)")
        cases = sorted(p for p in root.iterdir() if p.is_dir() and _CASE.match(p.name))
        if not cases:
            raise FileNotFoundError(f"no BraTS20_Training_NNN folders in {root}")
        items = []
        for case_dir in cases:
            case = case_dir.name
            subset = case.split("_")[1].lower()
            patient_id = f"brats20:{case}"
            for path in sorted(p for p in case_dir.iterdir() if p.is_file()):
                sequence = sequence_of(path, case)
                extra: dict[str, object] = {"sequence": sequence}
                if sequence is None:
                    extra[PRE_REJECTED] = {
                        "reason": "not an image volume",
                        "detail": "segmentation or stray file",
                    }
                items.append(
                    InputItem(
                        path=str(path),
                        dataset=f"{self.dataset}_{subset}",
                        kind="nifti",
                        label="MR",
                        modality="MR",
                        body_part="HEAD",
                        patient_id=patient_id,
                        study_uid=patient_id,
                        series_uid=f"{patient_id}/{sequence or path.name}",
                        slice_axis=2,
                        extra=extra,
                    )
                )
        return items
