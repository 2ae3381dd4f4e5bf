"""Streaming prepare's shards into training batches (webdataset, DDP-safe).

The shard format itself (PNG codec, sample decoding, which shards a split lists) lives in
:mod:`modality.shards`; this package reads it and never the reverse, so prepare does not pull in torch and
Lightning.
"""

from modality.data.datamodule import ModalityDataModule

__all__ = ["ModalityDataModule"]
