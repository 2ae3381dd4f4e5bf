"""``ModalityClassifier``: a LightningModule over a one-channel timm network.

Hyperparameters are plain types only (optimizer and scheduler as ``_target_`` dicts, ``data_info`` with the
classes and prepare's preprocessing), so a checkpoint loads with ``torch.load(weights_only=True)`` and
``eval.py`` can rebuild the exact preprocessing from the checkpoint alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import MeanMetric

from modality.intensity.value_stats import (
    FLOAT_FEATURES,
    RADIOGRAPH_CLASS,
    UNIT_FREE_CLASSES,
    VALUE_FEATURES,
    float_head_inputs,
    stored_as_float,
)
from modality.metrics.classification import confusion_figure, confusion_metric, scalar_metrics
from modality.models.networks import classifier_width, create_network, forward_with_features
from modality.models.value_head import (
    ValueStatsHead,
    balanced_weights,
    fit_float_head,
    fit_on_training_samples,
)

#: The reference study's optimiser and schedule (SGD lr 0.1, momentum 0.9; lr / 10 on a plateau).
DEFAULT_OPTIMIZER = {
    "_target_": "torch.optim.SGD",
    "_partial_": True,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 0.0,
}


def resolve_class_weights(
    class_weights: str | Sequence[float] | None, data_info: Mapping[str, Any]
) -> list[float] | None:
    """Per-class training loss weights from the ``class_weights`` option (see ModalityClassifier)."""
    if class_weights is None:
        return None
    classes = list(data_info.get("classes", []))
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(
                f"class_weights must be null, 'balanced' or one number per class, got {class_weights!r}"
            )
        counts = [int(c) for c in data_info.get("train_class_counts") or []]
        if len(counts) != len(classes) or sum(counts) == 0:
            raise ValueError(
                "class_weights=balanced needs data_info['train_class_counts'] (from the DataModule)"
            )
        return balanced_weights(counts)
    weights = [float(w) for w in class_weights]
    if (
        len(weights) != len(classes)
        or any(not math.isfinite(w) or w < 0 for w in weights)
        or sum(weights) == 0
    ):
        raise ValueError(f"class_weights needs {len(classes)} finite non-negative numbers, got {weights}")
    return weights


def plain(value: Any) -> Any:
    """Hydra/OmegaConf containers and tuples -> dict/list/str/number, so checkpoints unpickle safely."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def masked_region_loss(logits: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean cross-entropy over the rows whose region is known, known-row mask)``; unknown rows (-1) add
    nothing to the loss or its gradient, and a batch with no known row gives 0 (not NaN, as a plain mean
    over no rows would)."""
    known = regions >= 0
    per_row = F.cross_entropy(logits.float(), regions.clamp(min=0), reduction="none")
    total = (per_row * known).sum()
    return total / known.sum().clamp(min=1), known


class ModalityClassifier(pl.LightningModule):
    """Classify a one-channel slice into ``data_info["classes"]``.

    Args:
        network: reference name (``vgg16``, ``resnet18``, ``resnet34``, ``resnet50``, ``densenet121``,
            ``mnasnet``) or any timm model name.
        dropout: timm ``drop_rate`` (dropout before the classifier; VGG16 gets it in both FC layers).
        extra_dropout: ``nn.Dropout(p)`` after every max-pooling layer (the reference's regularised VGG16).
        optimizer / scheduler: ``_target_`` dicts with ``_partial_: true``; weight_decay is the L2 penalty.
        scheduler_monitor: metric a ReduceLROnPlateau watches.
        channels_last / compile: speed options (channels_last + bf16 pays on CPUs and tensor cores).
        data_info: classes, preprocess, normalize, mean01, std01, input_size, input_channels when not 1
            (from the DataModule).
        label_smoothing: training loss only (validation and test losses stay plain cross-entropy, so they
            compare across settings); keeps a network trained on few sources from growing over-confident.
        class_weights: training loss weights per class: ``null`` (none), ``balanced`` (N / (K * n_c) from
            ``data_info["train_class_counts"]``, the splits training reads, K = classes present; a class with no
            training sample gets 1), or one number per class. Training loss only, like ``label_smoothing``.
        value_head: also fit a :class:`~modality.models.value_head.ValueStatsHead` on the training samples'
            header-free value statistics (recorded by prepare) when fitting starts; ``eval.py`` then fuses
            it with the CNN, on raw files and on shards. The CNN, its training and its metrics are unchanged.
        float_value_head: with ``value_head``, a second value head answers the slices stored as floating
            point (NIfTI float32, as PET and scaled MR volumes are often published). It reads neither the
            stored peak (floats have none) nor ``fraction_non_integer`` (stored as floats, it says how a
            volume was scaled on export; :func:`~modality.intensity.value_stats.float_head_inputs`). Why a
            separate head: the main head read "no stored peak" as a fact about the scanner and, held out by
            source, called MR stored as floats CT (MR recall 0.58; this head 0.93), while one head trained on
            float copies as well cost stored PET 0.999 -> 0.905 (docs/results.md).
        body_part: a second, linear head on the same backbone features predicts the body-part region
            (``data_info["regions"]``, the datamodule's ``body_part`` batches). Its cross-entropy, times
            ``body_part_weight``, is added to the training loss over the samples whose region is known;
            unknown regions (index -1) are masked out, never guessed. ``{stage}/loss`` stays the modality
            loss (so it compares with runs without the head and drives the scheduler as before); the head's
            own figures are ``{stage}/region_loss``, ``region_acc``, ``region_balanced_acc``,
            ``region_recall_<region>`` and ``region_samples``. ``forward`` still returns the modality logits;
            :meth:`forward_heads` returns both.
    """

    def __init__(
        self,
        network: str = "resnet18",
        data_info: Mapping[str, Any] | None = None,
        dropout: float = 0.0,
        extra_dropout: float = 0.0,
        pretrained_path: str | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        scheduler_monitor: str = "val/loss",
        channels_last: bool = False,
        compile: bool = False,
        confusion_every_n_epochs: int = 1,
        label_smoothing: float = 0.0,
        class_weights: str | Sequence[float] | None = None,
        value_head: bool = False,
        float_value_head: bool = False,
        body_part: bool = False,
        body_part_weight: float = 1.0,
    ) -> None:
        super().__init__()
        data_info = plain(dict(data_info or {}))
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not data_info.get("classes"):
            raise ValueError("data_info must name the classes (ModalityDataModule.data_info())")
        weights = resolve_class_weights(class_weights, data_info)
        if body_part and not data_info.get("regions"):
            raise ValueError(
                "model.body_part needs data_info['regions'] from a datamodule with body_part=true "
                "(configs/data: body_part follows model.body_part)"
            )
        if not (math.isfinite(float(body_part_weight)) and float(body_part_weight) >= 0):
            raise ValueError(f"body_part_weight must be a finite non-negative number, got {body_part_weight}")
        hparams_body_part = (
            {"body_part": True, "body_part_weight": float(body_part_weight)} if body_part else {}
        )  # absent when off: a model without the head stores the hyperparameters it always stored
        float_head = bool(value_head) and bool(float_value_head)
        hparams_float = {"float_value_head": True} if float_head else {}  # absent when off, as above
        self.save_hyperparameters(
            {
                "network": network,
                "data_info": data_info,
                "dropout": float(dropout),
                "extra_dropout": float(extra_dropout),
                "pretrained_path": pretrained_path,
                "optimizer": plain(optimizer) if optimizer is not None else dict(DEFAULT_OPTIMIZER),
                "scheduler": plain(scheduler) if scheduler is not None else None,
                "scheduler_monitor": scheduler_monitor,
                "channels_last": bool(channels_last),
                "compile": bool(compile),
                "confusion_every_n_epochs": int(confusion_every_n_epochs),
                "label_smoothing": float(label_smoothing),
                "class_weights": plain(class_weights),
                "value_head": bool(value_head),
                **hparams_float,
                **hparams_body_part,
            }
        )
        # A buffer, so it follows the module to the device; not persistent: rebuilt from hparams on load.
        self.register_buffer(
            "train_loss_weights",
            torch.tensor(weights, dtype=torch.float32) if weights is not None else None,
            persistent=False,
        )
        self.classes: list[str] = list(data_info["classes"])
        self.network = create_network(
            network,
            len(self.classes),
            dropout,
            extra_dropout,
            pretrained_path,
            int(data_info.get("input_channels", 1)),
        )
        if channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.value_head = None
        self.value_head_float = None
        if value_head:
            # Drawn from a forked RNG: adding the head must not shift the random stream the CNN trains with
            # (its initial weights are replaced by fit() anyway).
            with torch.random.fork_rng(devices=[]):
                self.value_head = ValueStatsHead(len(VALUE_FEATURES), len(self.classes))
                if float_head:
                    self.value_head_float = ValueStatsHead(len(FLOAT_FEATURES), len(self.classes))
        self.regions: list[str] = list(data_info.get("regions") or []) if body_part else []
        self.region_head: torch.nn.Linear | None = None
        self._last_region_confusion: torch.Tensor | None = None
        if body_part:
            # A forked RNG, like the value head: adding the head leaves the stream the CNN trains with as it was.
            with torch.random.fork_rng(devices=[]):
                self.region_head = torch.nn.Linear(classifier_width(self.network), len(self.regions))
        self._forward_network = torch.compile(self.network) if compile else self.network
        # ModuleDict keys cannot be "train" (an nn.Module method), hence the "_metrics" suffix.
        self.confusion = torch.nn.ModuleDict(
            {f"{s}_metrics": confusion_metric(len(self.classes)) for s in self._stages}
        )
        self.mean_loss = torch.nn.ModuleDict({f"{s}_metrics": MeanMetric() for s in self._stages})
        if self.region_head is not None:
            self.region_confusion = torch.nn.ModuleDict(
                {f"{s}_metrics": confusion_metric(len(self.regions)) for s in self._stages}
            )
            self.region_loss = torch.nn.ModuleDict({f"{s}_metrics": MeanMetric() for s in self._stages})
        self.best_val_acc = -math.inf
        self._plateau: ReduceLROnPlateau | None = None
        self._plateau_state: dict[str, Any] | None = None

    _stages = ("train", "val", "test")

    def __setattr__(self, name: str, value: Any) -> None:
        # The compiled wrapper shares the network's parameters; registering it as a submodule would save
        # every weight twice under an "_orig_mod." prefix.
        if name == "_forward_network":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ----------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self._forward_network(images)

    def forward_heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(modality logits, region logits or None)`` from one pass through the backbone."""
        if self.region_head is None:
            return self(images), None
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits, features = forward_with_features(self.network, images)
        return logits, self.region_head(features)

    def on_fit_start(self) -> None:
        """Fit the value-statistics head (once; a resumed run restores it from the checkpoint)."""
        if self.value_head is None or self.value_head.is_fitted:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_value_features"):
            raise RuntimeError("model.value_head needs a ModalityDataModule (train_value_features)")
        features, labels = datamodule.train_value_features()
        if len(labels) == 0:
            self.print(
                "[modality] value-statistics head left unfitted: no training sample has physical units"
            )
            return
        unit_free = [i for i, name in enumerate(self.classes) if name in UNIT_FREE_CLASSES]
        xr = self.classes.index(RADIOGRAPH_CLASS) if RADIOGRAPH_CLASS in self.classes else None
        exports = datamodule.train_exported_radiographs(xr) if xr is not None else None
        sources = datamodule.train_value_sources()
        loss = fit_on_training_samples(self.value_head, features, labels, unit_free, exports, xr, sources)
        self.print(
            f"[modality] value-statistics head fitted on {len(labels)} samples from {len(set(sources))} "
            f"sources weighed alike within a class, unit-rescaled copies of {', '.join(UNIT_FREE_CLASSES)}, "
            f"smaller-export copies of all and {0 if exports is None else len(exports)} 8-bit radiographs "
            f"as DICOM (loss {loss:.3f})"
        )
        if self.value_head_float is not None:
            loss = fit_float_head(self.value_head_float, features, labels, unit_free, sources)
            self.print(f"[modality] float value head fitted on the same samples (loss {loss:.3f})")

    def float_head_rows(self, features: np.ndarray) -> np.ndarray:
        """Rows of ``features`` (N, len(VALUE_FEATURES)) the float value head answers: slices stored as floats,
        where the model has a fitted float head; the one rule :meth:`value_probabilities` routes by and the
        fusion reads (:func:`modality.models.value_head.float_head_rows`)."""
        x = np.asarray(features, dtype=np.float32)
        if self.value_head_float is None or not self.value_head_float.is_fitted or x.size == 0:
            return np.zeros(len(x), dtype=bool)
        return stored_as_float(x)

    def value_probabilities(self, features: np.ndarray) -> np.ndarray | None:
        """Class probabilities of the value-statistics head, or None when the model has no fitted head."""
        if self.value_head is None or not self.value_head.is_fitted:
            return None
        x = np.asarray(features, dtype=np.float32)
        device = self.value_head.mean.device
        with torch.inference_mode():
            logits = self.value_head(torch.as_tensor(x, device=device)).float()
            floats = self.float_head_rows(x)
            if floats.any():
                rows = torch.as_tensor(np.flatnonzero(floats), device=device)
                columns = torch.as_tensor(float_head_inputs(x[floats]), device=device)
                logits[rows] = self.value_head_float(columns).float()
        return torch.softmax(logits, dim=1).cpu().numpy()

    def _shared_step(self, batch: Sequence[torch.Tensor], stage: str) -> torch.Tensor:
        images, labels, *rest = batch
        if self.region_head is not None and not rest:
            raise ValueError("model.body_part needs batches with regions (the datamodule's body_part=true)")
        logits, region_logits = self.forward_heads(images) if rest else (self(images), None)
        smoothing = self.hparams.get("label_smoothing", 0.0) if stage == "train" else 0.0
        weight = self.train_loss_weights if stage == "train" else None
        loss = F.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing)
        self.confusion[f"{stage}_metrics"].update(logits.argmax(dim=1), labels)
        self.mean_loss[f"{stage}_metrics"].update(loss.detach(), weight=labels.numel())
        if region_logits is None:
            return loss
        regions = rest[0]
        region_loss, known = masked_region_loss(region_logits, regions)
        # Every step updates (also with no known region), so every rank's metric is updated alike.
        self.region_confusion[f"{stage}_metrics"].update(region_logits.argmax(dim=1)[known], regions[known])
        self.region_loss[f"{stage}_metrics"].update(region_loss.detach(), weight=int(known.sum()))
        return loss + float(self.hparams.body_part_weight) * region_loss

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        # Step-level values are this rank's own: a per-step sync would add a collective to every step.
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return torch.softmax(self(images).float(), dim=1)

    # ----------------------------------------------------------------- epoch ends (the only syncs)
    def _epoch_metrics(self, stage: str) -> tuple[dict[str, float], torch.Tensor]:
        confusion = self.confusion[f"{stage}_metrics"].compute()
        loss = self.mean_loss[f"{stage}_metrics"].compute()
        self.confusion[f"{stage}_metrics"].reset()
        self.mean_loss[f"{stage}_metrics"].reset()
        # "samples" (after the cross-rank sync) proves evaluation counted every sample exactly once.
        values = {"loss": float(loss), "samples": float(confusion.sum())} | scalar_metrics(
            confusion, self.classes
        )
        if self.region_head is not None:
            region_confusion = self.region_confusion[f"{stage}_metrics"].compute()
            region_loss = self.region_loss[f"{stage}_metrics"].compute()
            self.region_confusion[f"{stage}_metrics"].reset()
            self.region_loss[f"{stage}_metrics"].reset()
            self._last_region_confusion = region_confusion
            values["region_samples"] = float(region_confusion.sum())
            if values["region_samples"] > 0:  # no known region this epoch: nothing to report, not zeros
                values["region_loss"] = float(region_loss)
                values |= {
                    f"region_{key}": value
                    for key, value in scalar_metrics(region_confusion, self.regions).items()
                }
        return {f"{stage}/{key}": value for key, value in values.items()}, confusion

    def on_train_epoch_end(self) -> None:
        values, _ = self._epoch_metrics("train")
        self.log_dict(values, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        values, confusion = self._epoch_metrics("val")
        if self.trainer.sanity_checking:
            return
        self.best_val_acc = max(self.best_val_acc, values["val/acc"])
        values["val/acc_best"] = self.best_val_acc
        self._step_plateau(values)
        self.log("val/balanced_acc", values.pop("val/balanced_acc"), prog_bar=True)
        self.log_dict(values, sync_dist=False)
        if self.current_epoch % max(1, self.hparams.confusion_every_n_epochs) == 0:
            self._log_confusion_figure(confusion, "val/confusion_matrix")
            if self.region_head is not None:
                self._log_confusion_figure(
                    self._last_region_confusion, "val/region_confusion_matrix", self.regions
                )

    def on_test_epoch_end(self) -> None:
        values, confusion = self._epoch_metrics("test")
        self.log_dict(values, sync_dist=False)
        self._log_confusion_figure(confusion, "test/confusion_matrix")
        if self.region_head is not None:
            self._log_confusion_figure(
                self._last_region_confusion, "test/region_confusion_matrix", self.regions
            )

    def _log_confusion_figure(
        self, confusion: torch.Tensor, tag: str, names: Sequence[str] | None = None
    ) -> None:
        if not self.trainer.is_global_zero:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                title = f"{tag} epoch {self.current_epoch}"
                logger.experiment.add_figure(
                    tag, confusion_figure(confusion, names or self.classes, title), self.current_epoch
                )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_acc_best"] = float(self.best_val_acc)
        if self._plateau is not None:
            checkpoint["plateau_scheduler"] = self._plateau.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best_val_acc = float(checkpoint.get("val_acc_best", -math.inf))
        # Optimisers (and so the scheduler) are built after this hook on resume: keep the state until then.
        self._plateau_state = checkpoint.get("plateau_scheduler")
        if self._plateau is not None and self._plateau_state is not None:
            self._plateau.load_state_dict(self._plateau_state)

    def _step_plateau(self, values: Mapping[str, float]) -> None:
        """Step ReduceLROnPlateau right after validation, before any checkpoint of this epoch is written.

        Left to Lightning, the plateau step happens after the epoch's checkpoints are saved and is skipped
        on restart, so a resumed run would forget the last step and could reduce the learning rate at a
        different epoch than the uninterrupted run.
        """
        if self._plateau is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        monitor = self.hparams.scheduler_monitor
        if monitor not in values:
            raise KeyError(
                f"model.scheduler_monitor '{monitor}' is not a logged metric; have {sorted(values)}"
            )
        self._plateau.step(values[monitor])

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer)(params=self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler)(optimizer=optimizer)
        if isinstance(scheduler, ReduceLROnPlateau):
            self._plateau = scheduler
            if self._plateau_state is not None:
                scheduler.load_state_dict(self._plateau_state)
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "monitor": self.hparams.scheduler_monitor,
                "interval": "epoch",
                "frequency": 1,
            },
        }
