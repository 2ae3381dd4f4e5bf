"""The training job behind ``train.py``: build data, model, callbacks, loggers and trainer from the
composed config; fit; validate and test the best checkpoint; write ``run_summary.json``.

Kept free of Hydra's entry-point machinery so tests can call :func:`train` with a composed config.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only

from modality.training import hardware, resume
from modality.training.callbacks import RunHparams
from modality.training.isolation import (
    child_command,
    entry_point_command,
    expected_world_size,
    needs_isolation,
    run_isolated,
)
from modality.training.run_summary import RUN_SUMMARY_NAME, read_run_summary, stage_metrics, write_run_summary

CPU_IMAGE_SIZE = 64


def is_local_rank_zero() -> bool:
    """Lightning sets LOCAL_RANK in the processes it relaunches; the first process has none."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def uses_gpu(trainer_cfg: DictConfig) -> bool:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_auto_settings(cfg: DictConfig) -> dict[str, Any]:
    """Turn ``auto`` choices into concrete values before anything is built, record them in the config, and
    return the record of where the run computes (``run_summary.json["compute"]``, TensorBoard hparams).

    ``data.image_size: auto`` -> the stored size on a GPU, 64 px on CPUs (keeps ``python train.py`` within
    minutes on 2 cores). ``trainer.precision: auto`` -> on a GPU bf16-mixed where it has bf16, else
    16-mixed; on a CPU bf16-mixed only where the CPU computes bf16 natively, else 32-true (emulated bf16
    trained 15x slower; :mod:`modality.training.hardware`). ``cpu_threads: auto`` -> one torch thread on
    CPU runs with at most two usable cores. A refit reuses the record of the run it belongs to.
    """
    if cfg.get("compute"):
        record = dict(OmegaConf.to_container(cfg.compute, resolve=True))
        if record.get("torch_threads") and not uses_gpu(cfg.trainer):
            torch.set_num_threads(int(record["torch_threads"]))
        return record
    gpu = uses_gpu(cfg.trainer)
    cpu = hardware.describe_cpu()
    record: dict[str, Any] = {"accelerator": "gpu" if gpu else "cpu"}
    with open_dict(cfg):
        if str(cfg.data.get("image_size")) == "auto":
            cfg.data.image_size = None if gpu else CPU_IMAGE_SIZE
        if str(cfg.trainer.get("precision")) == "auto":
            precision, reason = hardware.choose_gpu_precision() if gpu else hardware.choose_cpu_precision(cpu)
            cfg.trainer.precision = precision
            reason = f"auto: {reason}"
        else:
            reason = "trainer.precision set in the config"
        record |= {"precision": str(cfg.trainer.precision), "precision_reason": reason}
        if gpu:
            threads, threads_reason = None, "GPU run: torch's default"
        else:
            nodes = int(cfg.trainer.get("num_nodes") or 1)
            processes = expected_world_size(cfg.trainer, cuda_devices=0) // nodes
            threads, threads_reason = hardware.choose_cpu_threads(cfg.get("cpu_threads", "auto"), processes)
        if threads is not None:
            torch.set_num_threads(threads)
        record |= {"torch_threads": torch.get_num_threads(), "threads_reason": threads_reason}
        record |= {f"cpu_{key}": value for key, value in hardware.as_record(cpu).items()}
        record["gpu"] = torch.cuda.get_device_name() if gpu and torch.cuda.is_available() else None
        cfg.compute = record
    if is_local_rank_zero():
        print(
            f"[modality] precision {record['precision']} ({reason}); {record['torch_threads']} torch thread(s) "
            f"({threads_reason}); CPU {cpu.model}, torch capability {cpu.torch_capability}"
        )
    return record


def build_model(cfg: DictConfig, data_info: dict[str, Any]) -> pl.LightningModule:
    """The model config's ``_target_`` called with plain arguments (optimizer/scheduler stay dicts, to be
    instantiated in ``configure_optimizers``), so hyperparameters are checkpoint-safe plain types."""
    params = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(params, dict)
    model_class = get_class(params.pop("_target_"))
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True) if cfg.get("optimizer") else None
    scheduler = OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None
    return model_class(data_info=data_info, optimizer=optimizer, scheduler=scheduler, **params)


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Callbacks/loggers: every entry of the group that has a ``_target_`` (null entries switch one off)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def as_float(value: Any) -> float | None:
    """Hydra parses ``weight_decay=0`` as the int 0 and YAML ``0.0`` as a float: record one type."""
    return None if value is None else float(value)


def summary_base(cfg: DictConfig) -> dict[str, Any]:
    return {
        "model": cfg.model.get("network"),
        "dropout": as_float(cfg.model.get("dropout")),
        "extra_dropout": as_float(cfg.model.get("extra_dropout")),
        "weight_decay": as_float(cfg.optimizer.get("weight_decay")) if cfg.get("optimizer") else None,
        "lr": as_float(cfg.optimizer.get("lr")) if cfg.get("optimizer") else None,
        "epochs": cfg.trainer.get("max_epochs"),
        "batch_size": cfg.data.get("batch_size"),
        "image_size": cfg.data.get("image_size"),
        "precision": str(cfg.trainer.get("precision")),
        # Where the run computed and why that precision and thread count (resolve_auto_settings).
        "compute": dict(OmegaConf.to_container(cfg.compute, resolve=True)) if cfg.get("compute") else None,
        "data_dir": str(cfg.data.get("data_dir")),
        "output_dir": str(cfg.paths.output_dir),
        "best_ckpt": None,
        "last_ckpt": None,
        "val": None,
        "test": None,
        "train_time_s": None,
        "images_per_s": None,
        "status": "failed",
        "error": None,
    }


def run_hparams(cfg: DictConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """The recipe and the compute choices, flat, for TensorBoard's HParams dashboard."""
    recipe = {
        key: summary.get(key)
        for key in ("model", "dropout", "extra_dropout", "weight_decay", "lr", "epochs", "batch_size")
    }
    recipe["image_size"] = summary.get("image_size")
    recipe["seed"] = cfg.get("seed")
    return recipe | {f"compute/{key}": value for key, value in (summary.get("compute") or {}).items()}


def checkpoint_path(output_dir: Path, name: str) -> str | None:
    path = output_dir / "checkpoints" / name
    return str(path) if path.is_file() else None


def fit_and_evaluate(cfg: DictConfig, summary: dict[str, Any]) -> pl.Trainer:
    """The Lightning part of a run; fills ``summary`` in place."""
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data)
    summary["augment"] = datamodule.augment.to_dict()  # every knob as checked, defaults included
    if is_local_rank_zero():
        # Before the model: classes and preprocessing come from summary.json, which may not exist yet.
        # Ranks > 0 are started by trainer.fit, after this has finished.
        datamodule.prepare_data()
    data_info = datamodule.data_info()
    summary["image_size"] = data_info["input_size"]
    model = build_model(cfg, data_info)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*instantiate_list(cfg.get("callbacks")), RunHparams(run_hparams(cfg, summary))],
        logger=instantiate_list(cfg.get("logger")),
    )
    ckpt = resume.checkpoint_file(cfg)
    if ckpt is not None and rank_zero_only.rank == 0:
        # Lightning's CSV logger deletes metrics.csv when it opens the run's csv/ folder.
        kept = resume.restore_csv_rows(trainer.loggers, ckpt)
        if kept:
            print(f"[modality] kept {kept} metrics.csv rows logged up to {ckpt.name}")
    if trainer.is_global_zero:
        print(f"[modality] run directory: {cfg.paths.output_dir}")
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    summary["train_time_s"] = round(time.perf_counter() - started, 2)
    for callback in trainer.callbacks:
        if hasattr(callback, "last_images_per_s") and callback.last_images_per_s is not None:
            summary["images_per_s"] = round(float(callback.last_images_per_s), 1)
    output_dir = Path(cfg.paths.output_dir)
    summary["best_ckpt"] = checkpoint_path(output_dir, "best.ckpt")
    summary["last_ckpt"] = checkpoint_path(output_dir, "last.ckpt")
    evaluate_ckpt = summary["best_ckpt"] or summary["last_ckpt"]
    if cfg.get("validate_best", True) and evaluate_ckpt:
        metrics = trainer.validate(model, datamodule=datamodule, ckpt_path=evaluate_ckpt, verbose=False)
        summary["val"] = stage_metrics(metrics[0] if metrics else {}, "val")
    else:
        summary["val"] = stage_metrics(trainer.callback_metrics, "val")
    if cfg.get("test", False) and datamodule.split_shards("test").urls:
        metrics = trainer.test(model, datamodule=datamodule, ckpt_path=evaluate_ckpt, verbose=False)
        summary["test"] = stage_metrics(metrics[0] if metrics else {}, "test")
    # After test: rank 0 predicts on the CPU alone here, so no other rank may be waiting in a collective.
    # A split the run trained on says nothing about unseen sources: never calibrate on one.
    splits = [s for s in cfg.get("calibration_splits") or [] if s not in set(datamodule.train_splits)]
    if splits and evaluate_ckpt and trainer.is_global_zero and getattr(model, "value_head", None) is not None:
        summary["calibration"] = calibrate(
            Path(evaluate_ckpt), Path(str(cfg.data.data_dir)), splits, output_dir
        )
    summary["status"] = "ok"
    return trainer


def calibrate(checkpoint: Path, data_dir: Path, splits: list[str], output_dir: Path) -> dict[str, Any] | None:
    """Fit the fusion of the CNN and the value head on ``splits`` (sources ``checkpoint`` did not train on)
    into ``<output_dir>/calibration.json``, which ``eval.py`` then uses for this run's checkpoints."""
    from dataclasses import asdict

    from modality.evaluation.shard_split import calibrate_on_splits

    fitted = calibrate_on_splits(checkpoint, data_dir, splits, output_dir / "calibration.json")
    if fitted is None:
        print(f"[modality] no {'+'.join(splits)} samples: the fusion keeps eval.py's fixed rule")
        return None
    print(
        f"[modality] fusion calibrated on {'+'.join(splits)} ({fitted.fitted_on['samples']} samples): "
        f"CNN scale {fitted.cnn_scale:g}, value-head scale {fitted.values_scale:g}, fused "
        f"{fitted.rule} -> {output_dir}/calibration.json"
    )
    return asdict(fitted)


def print_where(output_dir: str) -> None:
    if (Path(output_dir) / "checkpoints").is_dir():  # fast_dev_run writes none
        print(f"[modality] checkpoints: {output_dir}/checkpoints (best.ckpt, last.ckpt, epoch_XXX.ckpt)")
    if (Path(output_dir) / "tensorboard").is_dir():
        print(f"[modality] TensorBoard: tensorboard --logdir {output_dir}/tensorboard")
    print(f"[modality] summary: {output_dir}/run_summary.json")


def optimized_value(cfg: DictConfig, summary: dict[str, Any] | None) -> float:
    """The metric a sweeper optimises (``optimized_metric: val/balanced_acc``); NaN for failed runs."""
    name = cfg.get("optimized_metric")
    if not name or not summary or summary.get("status") != "ok":
        return math.nan
    stage, _, key = str(name).partition("/")
    value = (summary.get(stage) or {}).get(key)
    return float(value) if value is not None else math.nan


def train(cfg: DictConfig, is_multirun: bool = False) -> float:
    """One training run. In a multirun, a crash is recorded in run_summary.json and NaN returned so the
    sweep continues; in a single run the error propagates (non-zero exit) after it is recorded."""
    resolve_auto_settings(cfg)
    summary = summary_base(cfg)
    trainer: pl.Trainer | None = None
    try:
        trainer = fit_and_evaluate(cfg, summary)
    except Exception as error:
        summary["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        if rank_zero_only.rank == 0:  # the trainer may not exist yet; Lightning sets the rank from the env
            write_run_summary(cfg.paths.output_dir, summary)
        if not is_multirun:
            raise
        return math.nan
    if trainer.is_global_zero:
        write_run_summary(cfg.paths.output_dir, summary)
        print_where(str(cfg.paths.output_dir))
    return optimized_value(cfg, summary)


def train_in_subprocess(cfg: DictConfig, overrides: list[str], config_name: str) -> float:
    """A DDP multirun job as its own single run (see :mod:`modality.training.isolation`)."""
    job_dir = str(cfg.paths.output_dir)
    command = child_command(entry_point_command(), config_name, overrides, job_dir)
    print(f"[modality] multirun job with DDP -> own process: {' '.join(command)}")
    (Path(job_dir) / RUN_SUMMARY_NAME).unlink(missing_ok=True)  # never mistake an older run's summary
    code, tail = run_isolated(command, job_dir, cfg.get("job_timeout_s"))
    summary = read_run_summary(job_dir)
    if summary is None:  # died before writing its summary (killed, out of memory, timeout)
        summary = summary_base(cfg) | {"error": f"exit code {code} without run_summary.json: {tail[-1500:]}"}
        write_run_summary(job_dir, summary)
    elif code != 0 and summary.get("status") == "ok":
        print(f"[modality] job in {job_dir} exited with {code} after a complete run; kept as ok")
    if summary.get("status") != "ok":
        print(f"[modality] job in {job_dir} failed (exit code {code}); the sweep continues")
    return optimized_value(cfg, summary)


def refit_config(cfg: DictConfig) -> DictConfig | None:
    """The configuration of the refit stage, or None when ``refit.train_splits`` is not set.

    A refit trains the same recipe again on the union of ``refit.train_splits`` (e.g. train + val + test)
    into ``<output_dir>/<refit.subdir>``: once unseen sources have measured a recipe, the model users keep
    should learn from every source. It keeps the last checkpoint (its validation data is now seen, so
    "best" would select on training data) and runs no validation or test pass of its own.
    """
    refit = cfg.get("refit")
    if not refit or not refit.get("train_splits"):
        return None
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # dirs follow the new output_dir
    new.data.train_splits = list(refit.train_splits)
    new.paths.output_dir = str(Path(cfg.paths.output_dir) / str(refit.get("subdir") or "refit"))
    new.refit = None
    new.validate_best = False
    new.calibration_splits = None  # its validation data is training data now; see refit()
    new.test = False
    new.ckpt_path = None
    if new.get("callbacks") and "best_checkpoint" in new.callbacks:
        new.callbacks.best_checkpoint = None  # "best" on seen validation data would mislead
    return new


def refit(cfg: DictConfig) -> str | None:
    """Run the refit stage of ``cfg`` (if configured); returns the path of its final checkpoint."""
    refit_cfg = refit_config(cfg)
    if refit_cfg is None:
        return None
    splits = "+".join(refit_cfg.data.train_splits)
    print(f"[modality] refit: the same recipe on {splits} -> {refit_cfg.paths.output_dir}")
    train(refit_cfg)
    final = checkpoint_path(Path(refit_cfg.paths.output_dir), "last.ckpt")
    if final and rank_zero_only.rank == 0:
        measured = checkpoint_path(Path(cfg.paths.output_dir), "best.ckpt")
        if measured:
            print(f"[modality] measured on unseen sources: {measured}")
        # The refit saw every source, so nothing is left to calibrate it on: it takes the fusion fitted on
        # the measured model's predictions for the sources that model never saw (same recipe).
        calibration_splits = list(cfg.refit.get("calibration_splits") or [])
        if measured and calibration_splits:
            calibrate(
                Path(measured),
                Path(str(cfg.data.data_dir)),
                calibration_splits,
                Path(refit_cfg.paths.output_dir),
            )
        print(f"[modality] final model (trained on {splits}, last epoch): {final}")
    return final


def run(cfg: DictConfig) -> float:
    """Entry from ``train.py``'s ``@hydra.main``: isolate DDP multirun jobs, otherwise train here."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    is_multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if resume.is_resume(cfg, hydra_cfg):
        cfg = resume.resumed_config(cfg, hydra_cfg)
    if needs_isolation(is_multirun, cfg.trainer, str(cfg.get("job_isolation", "auto"))):
        return train_in_subprocess(cfg, list(hydra_cfg.overrides.task), str(hydra_cfg.job.config_name))
    value = train(cfg, is_multirun=is_multirun)
    if not is_multirun:
        refit(cfg)
    return value
