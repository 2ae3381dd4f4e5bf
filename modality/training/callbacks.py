"""Callbacks the training configs add beyond Lightning's own."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl


class ThroughputMonitor(pl.Callback):
    """Logs ``train/images_per_s``: training images per second of wall time over an epoch, all ranks summed.

    The reference study could not say where its 8-hour epochs went; a throughput curve next to the loss
    shows at once whether a run is input-bound.
    """

    def __init__(self) -> None:
        self.images = 0
        self.started = 0.0
        self.last_images_per_s: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.images = 0
        self.started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.images += int(batch[1].shape[0])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = time.perf_counter() - self.started
        if elapsed <= 0 or self.images == 0:
            return
        # Every rank runs the same number of equal batches (with_epoch), so scaling by world size is exact.
        self.last_images_per_s = self.images * trainer.world_size / elapsed
        pl_module.log("train/images_per_s", self.last_images_per_s, sync_dist=False)
