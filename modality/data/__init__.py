"""Streaming prepare's shards into training batches (webdataset, DDP-safe)."""

from modality.data.datamodule import ModalityDataModule

__all__ = ["ModalityDataModule"]
