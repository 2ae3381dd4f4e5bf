"""A test-only callback (added with ``+callbacks.probe=...``) recording which tiny-shard samples each rank saw.

Sample numbers are written into the first two pixels by ``tiny_shards``; batches arrive normalised to
[-1, 1] at the stored size, so the uint8 values are recovered exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn


def batch_sample_ids(images: torch.Tensor) -> list[int]:
    pixels = ((images[:, 0, 0, :2].float() + 1.0) / 2.0 * 255.0).round().long()
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


class SampleProbe(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.train: list[list[int]] = []
        self.val: list[list[int]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train.append([])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.train[-1].append(len(batch[1]))
        self.train[-1].extend([-1])  # batch separator
        self.train[-1].extend(batch_sample_ids(batch[0]))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self.val.append([])

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self.val[-1].extend(batch_sample_ids(batch[0]))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = []
        for record in self.train:
            batches, ids, i = 0, [], 0
            while i < len(record):
                size = record[i]
                batches += 1
                ids.extend(record[i + 2 : i + 2 + size])
                i += 2 + size
            epochs.append({"batches": batches, "ids": ids})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"rank": trainer.global_rank, "world": trainer.world_size, "train": epochs, "val": self.val}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))
