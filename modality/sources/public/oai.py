"""Osteoarthritis Initiative (OAI): knee MR and radiographs as a DICOM tree.

The distribution nests ``<visit>/<batch>/<participant>/<date>/<series>/<image files>`` with files that
usually have no extension. The DICOM headers carry Modality (MR, CR/DX), PatientID and BodyPartExamined, so
the source vouches for nothing and lets the headers label each file. Every file is listed except obvious
documentation (text, spreadsheets, archives), so non-DICOM strays are rejected by the reader with a reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

from modality.records import InputItem
from modality.sources.public import require_directory

log = logging.getLogger(__name__)

DOCUMENT_SUFFIXES = frozenset({".txt", ".csv", ".md", ".pdf", ".xls", ".xlsx", ".zip", ".json", ".sas7bdat"})


class OAISource:
    """One DICOM InputItem per file; dataset ``oai`` (all visits: the same participants recur across them)."""

    def __init__(self, root: str | Path, dataset: str = "oai") -> None:
        self.root = Path(root)
        self.dataset = dataset

    def items(self) -> list[InputItem]:
        root = require_directory(self.root, "OAI image root")
        items = []
        documents = 0
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if path.name.startswith(".") or path.suffix.lower() in DOCUMENT_SUFFIXES:
                documents += 1
                continue
            items.append(InputItem(path=str(path), dataset=self.dataset, kind="dicom"))
        if documents:
            log.info("OAI: %d documentation or hidden files under %s not listed", documents, root)
        if not items:
            raise FileNotFoundError(f"no image files under {root}")
        return items
