"""Callbacks the training configs add beyond Lightning's own."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.nn.modules.batchnorm import _BatchNorm


class ThroughputMonitor(pl.Callback):
    """Logs ``train/images_per_s``: training images per second of wall time (first to last training batch of
    the epoch, loading included), all ranks summed.

    The reference study could not say where its 8-hour epochs went; a throughput curve next to the loss
    shows at once whether a run is input-bound.
    """

    def __init__(self) -> None:
        self.images = 0
        self.started = 0.0
        self.last_batch_end = 0.0
        self.last_images_per_s: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.images = 0
        self.started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.images += int(batch[1].shape[0])
        self.last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Up to the last training batch: the validation that runs inside the epoch is not training time.
        elapsed = self.last_batch_end - self.started
        if elapsed <= 0 or self.images == 0:
            return
        # Every rank runs the same number of equal batches (with_epoch), so scaling by world size is exact.
        self.last_images_per_s = self.images * trainer.world_size / elapsed
        pl_module.log("train/images_per_s", self.last_images_per_s, sync_dist=False)


class PreciseBatchNorm(pl.Callback):
    """Re-estimate BatchNorm running statistics with the current weights before each validation.

    Why: with the reference study's SGD lr 0.1, weights move so fast that BatchNorm's running averages
    (momentum 0.1) describe weights from several steps ago. Measured on the demo after two epochs
    (resnet18, 64 px): validation balanced accuracy 0.40 with the running statistics, 0.99 with batch
    statistics, 0.99 after this re-estimation from 8 training batches. The reference study's large
    train/validation gap may partly be this artefact. Only training images are used; under DDP the
    statistics are averaged over ranks so every rank validates the same network.
    """

    def __init__(self, batches: int = 8) -> None:
        self.batches = int(batches)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.batches <= 0 or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        norms = [module for module in pl_module.modules() if isinstance(module, _BatchNorm)]
        datamodule = trainer.datamodule
        if not norms or datamodule is None or not hasattr(datamodule, "calibration_batches"):
            return
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the calibration batches
        was_training = pl_module.training
        pl_module.train()
        epoch = trainer.fit_loop.epoch_progress.current.processed
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for batch in datamodule.calibration_batches(self.batches, epoch):
                # Moves the batch and runs the datamodule's on_after_batch_transfer (normalise, resize).
                images, _ = trainer.strategy.batch_to_device(batch)
                pl_module(images)
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
            if trainer.world_size > 1:
                norm.running_mean.copy_(trainer.strategy.reduce(norm.running_mean, reduce_op="mean"))
                norm.running_var.copy_(trainer.strategy.reduce(norm.running_var, reduce_op="mean"))
        pl_module.train(was_training)


class WeightAveraging(pl.Callback):
    """Validate and checkpoint the running average of the weights over the later part of training.

    Why: on unseen sources the real-data runs swing widely from epoch to epoch (validation accuracy 0.6 in one
    epoch, 0.98 in another), so the epoch that is saved is partly luck. Averaging the weights of every training
    step from ``start_fraction`` of ``max_epochs`` (or from ``start_epoch``) on is stochastic weight averaging,
    dense as in SWAD, which is reported to transfer better across domains. Measured on the real corpus
    (docs/results.md, 4 seeds x 2 held-out halves): 0.685 vs 0.678 balanced accuracy, within the seed spread,
    so it is off by default.

    How: training always continues from the raw weights. Before each validation from the start epoch on, the
    raw weights are set aside and the average is loaded; BatchNorm statistics for it are then re-estimated by
    :class:`PreciseBatchNorm` (keep it on), validation and checkpoints see the averaged network, and the raw
    weights come back when the next training epoch starts. When fit ends the module keeps the average. The
    average, its count and the set-aside raw weights are part of the checkpoint, so a resumed run continues
    exactly.
    """

    def __init__(self, start_fraction: float = 0.5, start_epoch: int | None = None) -> None:
        if not 0.0 <= start_fraction < 1.0:
            raise ValueError(f"start_fraction must be in [0, 1), got {start_fraction}")
        self.start_fraction = float(start_fraction)
        self.fixed_start = None if start_epoch is None else int(start_epoch)
        self.count = 0
        self.average: dict[str, torch.Tensor] = {}
        self.raw: dict[str, torch.Tensor] | None = None

    def start_epoch(self, trainer: pl.Trainer) -> int:
        """``start_epoch`` when given (a resumed run that raises max_epochs keeps it), else the fraction."""
        if self.fixed_start is not None:
            return self.fixed_start
        return int(self.start_fraction * max(1, trainer.max_epochs or 1))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch < self.start_epoch(trainer):
            return
        self.count += 1
        with torch.no_grad():
            for name, param in pl_module.named_parameters():
                value = param.detach().float()
                if name not in self.average:
                    self.average[name] = value.clone()
                else:
                    self.average[name].add_(value - self.average[name], alpha=1.0 / self.count)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not self.count:
            return
        if self.raw is None:
            self.raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        with torch.no_grad():
            for name, param in pl_module.named_parameters():
                param.copy_(self.average[name].to(param.dtype))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_raw(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_raw(pl_module)  # resumed from a checkpoint that holds the average

    def _restore_raw(self, pl_module: pl.LightningModule) -> None:
        if self.raw is not None:
            pl_module.load_state_dict({k: v.to(pl_module.device) for k, v in self.raw.items()})
            self.raw = None

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "average": self.average, "raw": self.raw}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count = int(state_dict["count"])
        self.average = dict(state_dict["average"])
        self.raw = dict(state_dict["raw"]) if state_dict.get("raw") is not None else None


class RunHparams(pl.Callback):
    """Write the run's recipe and compute choices (precision and why, CPU, threads) as TensorBoard hparams,
    linked to the metrics the HParams dashboard should show beside them, and into every logger's
    ``hparams.yaml``.

    Why a callback of its own: the loggers are configured with ``default_hp_metric: false`` (no fake
    ``hp_metric`` curve), and Lightning then writes no HParams event at all, only ``hparams.yaml``.
    """

    METRICS = ("val/balanced_acc", "val/acc", "val/loss", "test/balanced_acc", "train/images_per_s")

    def __init__(self, hparams: dict[str, Any]) -> None:
        self.hparams = {key: hparam_value(value) for key, value in hparams.items()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from pytorch_lightning.loggers import TensorBoardLogger
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        for logger in trainer.loggers:
            logger.log_hyperparams(self.hparams)
            if isinstance(logger, TensorBoardLogger):
                # Only metric names go into the experiment; their values are the scalars logged in training.
                experiment, start, end = hparams_summary(self.hparams, dict.fromkeys(self.METRICS, 0.0))
                writer = logger.experiment._get_file_writer()
                for event in (experiment, start, end):
                    writer.add_summary(event)
                writer.flush()


def hparam_value(value: Any) -> bool | int | float | str:
    """TensorBoard hparams hold numbers, booleans and strings: lists become "a, b", None "none"."""
    if isinstance(value, bool | int | float | str):
        return value
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value)
    return str(value)
