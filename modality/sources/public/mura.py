"""MURA (Stanford): musculoskeletal radiographs of the upper limb as a PNG tree.

Layout: ``MURA-v1.1/{train,valid}/XR_<BODYPART>/patientNNNNN/studyN_<positive|negative>/imageN.png``. The body
part comes from the ``XR_`` folder (ELBOW, FINGER, FOREARM, HAND, HUMERUS, SHOULDER, WRIST); each of the
publisher's splits becomes a dataset (``mura_train``, ``mura_valid``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from modality.records import InputItem
from modality.sources.public import RADIOGRAPH_CODE, require_directory

log = logging.getLogger(__name__)

_IMAGE = re.compile(r"^image\d+\.png$", re.IGNORECASE)
_STUDY = re.compile(r"^(study\d+)_(positive|negative)$")


class MURASource:
    """One InputItem per ``imageN.png``: class XR, body part from ``XR_<PART>``, patient ``mura:patientNNNNN``."""

    def __init__(
        self, root: str | Path, splits: tuple[str, ...] = ("train", "valid"), dataset: str = "mura"
    ) -> None:
        self.root = Path(root)
        self.splits = tuple(splits)
        self.dataset = dataset

    def items(self) -> list[InputItem]:
        root = require_directory(self.root, "MURA root (MURA-v1.1)")
        items: list[InputItem] = []
        ignored = 0
        for split in self.splits:
            split_dir = require_directory(root / split, f"MURA split folder {split!r}")
            for path in sorted(split_dir.glob("XR_*/patient*/study*/*")):
                study = _STUDY.match(path.parent.name)
                if not path.is_file() or not _IMAGE.match(path.name) or study is None:
                    ignored += 1  # e.g. macOS "._image1.png" resource forks shipped in the archive
                    continue
                body_part = path.parent.parent.parent.name.removeprefix("XR_")
                patient_id = f"mura:{path.parent.parent.name}"
                items.append(
                    InputItem(
                        path=str(path),
                        dataset=f"{self.dataset}_{split}",
                        kind="image",
                        label="XR",
                        modality=RADIOGRAPH_CODE,
                        body_part=body_part,
                        patient_id=patient_id,
                        study_uid=f"{patient_id}/{body_part}/{study.group(1)}",
                        extra={"finding": study.group(2)},
                    )
                )
        if ignored:
            log.warning(
                "MURA: %d files under %s are not imageN.png in a studyN_<label> folder; ignored",
                ignored,
                root,
            )
        return items
