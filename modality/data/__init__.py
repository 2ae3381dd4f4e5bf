"""Streaming prepare's shards into training batches (webdataset, DDP-safe).

``ModalityDataModule`` is imported on first use (PEP 562): prepare imports
:mod:`modality.data.png_codec` (the one PNG encoder) and must not pull in torch and Lightning with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modality.data.datamodule import ModalityDataModule

__all__ = ["ModalityDataModule"]


def __getattr__(name: str) -> Any:
    if name == "ModalityDataModule":
        from modality.data.datamodule import ModalityDataModule

        return ModalityDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
