"""Test-shard evaluation behind ``python eval.py ckpt_path=<checkpoint or run dir>``.

Why not ``Trainer.test``: the numbers must be auditable per sample. This loop keeps every sample's key,
dataset and body part next to its probabilities, gathers them from all DDP ranks, and checks that the
number of distinct samples equals ``summary.json``'s count for the split before writing anything, so a
sampler that pads, drops or duplicates samples cannot go unnoticed.

Data order: shards in summary.json order, sample ``j`` of the stream goes to rank ``j % world_size``
(:func:`modality.data.stages.keep_rank_share`, the same share the DataModule's test loader uses).
Timing (:mod:`modality.evaluation.timing`) runs on rank 0. ``calibrate_on_splits`` fits the fusion on
held-out splits the same way (called by the train job).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modality.evaluation.checkpoint import (
    find_calibration,
    load_classifier,
    preprocess_differences,
    resolve_checkpoint,
    run_data_dir,
)
from modality.evaluation.timing import hardware_description, time_forward
from modality.evaluation.writers import output_folder, write_confusion_csv, write_csv
from modality.labels.body_parts import UNKNOWN
from modality.metrics.calibration import DEFAULT_BINS, expected_calibration_error, reliability_table
from modality.metrics.scores import (
    accuracy_by_group,
    classification_summary,
    confusion_counts,
    row_normalised,
)
from modality.models.fusion import FusionCalibration
from modality.models.value_head import DEFAULT_CNN_WEIGHT

# ---------------------------------------------------------------- reading the split


@dataclass
class SplitPredictions:
    """Per-sample results of one rank (or all ranks after gathering)."""

    keys: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    body_parts: list[str] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    probs: list[list[float]] = field(default_factory=list)  # what is scored: fused when the model has a head
    cnn_probs: list[list[float]] = field(default_factory=list)  # the CNN's own
    # the value head's own; None where it abstained (no physical units) or the model has none
    value_probs: list[list[float] | None] = field(default_factory=list)
    exported: list[bool] = field(
        default_factory=list
    )  # scored as a simulated 8-bit export (simulate_exports)
    # models with a body-part head: each sample's recorded head region (``unknown`` allowed) and the head's
    # probabilities; both empty for models without the head
    regions: list[str] = field(default_factory=list)
    region_probs: list[list[float]] = field(default_factory=list)

    def extend(self, other: SplitPredictions) -> None:
        for name in (
            "keys",
            "shards",
            "datasets",
            "body_parts",
            "targets",
            "probs",
            "cnn_probs",
            "value_probs",
            "exported",
            "regions",
            "region_probs",
        ):
            getattr(self, name).extend(getattr(other, name))

    def __len__(self) -> int:
        return len(self.keys)


def _collate_with_meta(samples: list[tuple[torch.Tensor, int, str, dict[str, Any]]]) -> dict[str, Any]:
    return {
        "images": torch.stack([s[0] for s in samples]),
        "targets": [int(s[1]) for s in samples],
        "keys": [s[2] for s in samples],
        "meta": [s[3] for s in samples],
    }


def decode_with_meta(sample: dict[str, Any]) -> tuple[torch.Tensor, int, str, dict[str, Any]]:
    """``(image (1, H, W) uint8, class index, key, json metadata + shard name)`` of one tar sample."""
    from modality.shards.decode import decode_sample, sample_image

    decoded = decode_sample(sample)
    image = torch.from_numpy(np.array(sample_image(decoded), dtype=np.uint8)).unsqueeze(0)
    if "cls" not in decoded:
        raise ValueError(f"sample {sample.get('__key__')!r} has no .cls member")
    meta = decoded.get("json") if isinstance(decoded.get("json"), dict) else {}
    meta = {**meta, "__shard__": Path(str(sample.get("__url__", ""))).name}
    return image, int(decoded["cls"]), str(sample.get("__key__", "")), meta


def split_batches(
    urls: Sequence[str], batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, Any]]:
    """This rank's share of a split's samples, in batches with keys and metadata."""
    import webdataset as wds

    from modality.data.stages import StreamPosition, eval_pipeline

    yield from eval_pipeline(
        urls,
        StreamPosition(rank=rank, world_size=world_size),
        decode_with_meta,
        wds.batched(batch_size, collation_fn=_collate_with_meta, partial=True),
    )


def predict_split(
    model: torch.nn.Module,
    data_info: Mapping[str, Any],
    urls: Sequence[str],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    fusion: str = "product",
    cnn_weight: float = DEFAULT_CNN_WEIGHT,
    calibration: FusionCalibration | None = None,
    simulate_exports: bool = False,
) -> SplitPredictions:
    """Softmax probabilities for this rank's share of the split, normalised as in training; for a model with a
    fitted value head, fused with it from each sample's recorded ``value_features`` as raw-file prediction
    does (``fusion``: product, cnn or values; see :func:`modality.models.value_head.combine_with_values`).
    The value head abstains on samples without physical units (8-bit image files, colour DICOM).

    ``simulate_exports``: every sample with physical units is first turned into a simulated 8-bit export
    (window, quantisation, resampling, JPEG; :func:`modality.data.batch_transforms.simulate_export`, seeded
    by the sample's key, so reruns agree) and scored as one: the value head abstains on it, as it would on
    a real PNG/JPEG of the scan. ``exported`` marks those rows."""
    from modality.data.batch_transforms import model_inputs
    from modality.models.fusion import has_physical_units
    from modality.models.value_head import check_fusion, combine_answers, float_head_rows, value_head_answers

    check_fusion(fusion)

    device = next(model.parameters()).device
    out = SplitPredictions()
    with torch.inference_mode():
        for batch in split_batches(urls, batch_size, rank, world_size):
            units = [has_physical_units(m) for m in batch["meta"]]
            exported = [u and simulate_exports for u in units]
            images = batch["images"]
            if any(exported):
                images = _as_exports(images, exported, batch["keys"])
            inputs = model_inputs(images.to(device), data_info)
            logits, region_logits = forward_heads(model, inputs)
            cnn = torch.softmax(logits.float(), dim=1).cpu().numpy()
            if region_logits is not None:
                out.region_probs.extend(torch.softmax(region_logits.float(), dim=1).cpu().numpy().tolist())
                out.regions.extend(str(m.get("region") or UNKNOWN) for m in batch["meta"])
            features = [
                m.get("value_features") if u and not e else None
                for m, u, e in zip(batch["meta"], units, exported, strict=True)
            ]
            values, answers = value_head_answers(model, features, cnn.shape[1])
            floats = float_head_rows(model, features)
            probs = combine_answers(cnn, values, answers, fusion, cnn_weight, calibration, floats)
            out.value_probs.extend(
                values[i].tolist() if values is not None and answers[i] else None for i in range(len(cnn))
            )
            out.cnn_probs.extend(cnn.tolist())
            out.exported.extend(exported)
            out.keys.extend(batch["keys"])
            out.shards.extend(m.get("__shard__", "") for m in batch["meta"])
            out.datasets.extend(str(m.get("dataset", "")) for m in batch["meta"])
            out.body_parts.extend(str(m.get("body_part") or "unknown") for m in batch["meta"])
            out.targets.extend(batch["targets"])
            out.probs.extend(probs.tolist())
    return out


def forward_heads(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Modality logits and, for a model with a body-part head, its region logits (one backbone pass)."""
    if getattr(model, "region_head", None) is not None:
        return model.forward_heads(inputs)
    return model(inputs), None


def region_metrics(
    regions: Sequence[str],
    region_probs: Sequence[Sequence[float]],
    names: Sequence[str],
    datasets: Sequence[str],
) -> dict[str, Any]:
    """metrics.json's ``region`` block: the body-part head scored on the samples whose region is known (a
    region that is not one of the head's counts as unknown), with the unknown ones counted beside."""
    index = {name: i for i, name in enumerate(names)}
    rows = [i for i, r in enumerate(regions) if r in index]
    targets = np.asarray([index[regions[i]] for i in rows], dtype=np.int64)
    probs = np.asarray([region_probs[i] for i in rows], dtype=np.float64).reshape(len(rows), len(names))
    return {
        "regions": list(names),
        "unknown": len(regions) - len(rows),
        **head_scores(probs, targets, names, [datasets[i] for i in rows], "region"),
    }


def head_scores(
    probs: np.ndarray,
    targets: np.ndarray,
    names: Sequence[str],
    datasets: Sequence[str],
    noun: str,
    body_parts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The classification summary, confusion matrix (rows ``true <noun>``) and accuracy per dataset (and per
    body part, when given) of one head's probabilities: the same block for the modality (``class``) and the
    body-part head (``region``)."""
    predicted = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    confusion = confusion_counts(targets, predicted, len(names))
    return {
        **classification_summary(confusion, names),
        "confusion_matrix": {
            "rows": f"true {noun}",
            "columns": f"predicted {noun}",
            "classes": list(names),
            "counts": confusion.tolist(),
            "row_normalised": np.round(row_normalised(confusion), 6).tolist(),
        },
        "per_dataset": accuracy_by_group(datasets, targets, predicted, names),
    } | (
        {}
        if body_parts is None
        else {"per_body_part": accuracy_by_group(body_parts, targets, predicted, names)}
    )


def _as_exports(images: torch.Tensor, exported: Sequence[bool], keys: Sequence[str]) -> torch.Tensor:
    """The batch with the marked uint8 images replaced by simulated exports, each seeded by its own key."""
    import zlib

    from modality.data.batch_transforms import simulate_export

    out = images.clone()
    for i, flag in enumerate(exported):
        if flag:
            out[i : i + 1] = simulate_export(images[i : i + 1], seed=zlib.crc32(keys[i].encode("utf-8")))
    return out


def check_counts(predictions: SplitPredictions, expected: int) -> dict[str, Any]:
    """Every sample exactly once: no repeated (shard, key) and the total equals summary.json's count."""
    pairs = list(zip(predictions.shards, predictions.keys, strict=True))
    duplicates = len(pairs) - len(set(pairs))
    return {
        "expected": int(expected),
        "counted": len(pairs),
        "distinct": len(set(pairs)),
        "duplicates": duplicates,
        "ok": duplicates == 0 and len(pairs) == expected,
    }


# ---------------------------------------------------------------- metrics


def compute_metrics(
    predictions: SplitPredictions,
    classes: Sequence[str],
    n_bins: int = DEFAULT_BINS,
    regions: Sequence[str] = (),
) -> dict[str, Any]:
    """Everything metrics.json reports about the predictions (timing and provenance are added by the caller);
    with a body-part head (``regions``, its region names), a ``region`` block (:func:`region_metrics`)."""
    probs = np.asarray(predictions.probs, dtype=np.float64).reshape(len(predictions), len(classes))
    targets = np.asarray(predictions.targets, dtype=np.int64)
    return {
        **head_scores(probs, targets, classes, predictions.datasets, "class", predictions.body_parts),
        "ece": {
            "value": expected_calibration_error(probs, targets, n_bins),
            "n_bins": n_bins,
            "definition": "top-label ECE, equal-width bins (b/n, (b+1)/n] over max probability; "
            "sum of bin share * |bin accuracy - bin mean confidence|",
            "reliability": reliability_table(probs, targets, n_bins),
        },
    } | (
        {
            "region": region_metrics(
                predictions.regions, predictions.region_probs, regions, predictions.datasets
            )
        }
        if regions and predictions.region_probs
        else {}
    )


def predictions_rows(
    predictions: SplitPredictions, classes: Sequence[str], regions: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """predictions.csv rows in key order (stable whatever the rank interleaving was); with a body-part head,
    ``region`` (recorded), ``region_predicted``, ``region_correct`` (empty where the region is unknown) and
    ``region_prob_<region>``."""
    rows = []
    for i in range(len(predictions)):
        probs = predictions.probs[i]
        best = int(np.argmax(probs))
        row: dict[str, Any] = {
            "key": predictions.keys[i],
            "shard": predictions.shards[i],
            "dataset": predictions.datasets[i],
            "body_part": predictions.body_parts[i],
            "true": classes[predictions.targets[i]],
            "predicted": classes[best],
            "correct": int(best == predictions.targets[i]),
        }
        row.update({f"prob_{c}": round(float(p), 6) for c, p in zip(classes, probs, strict=True)})
        if predictions.exported:
            row["exported"] = int(predictions.exported[i])
        # Each head's own probabilities, so fusion can be refitted on held-out predictions (crossval).
        if predictions.cnn_probs:
            row.update(
                {
                    f"cnn_prob_{c}": round(float(p), 6)
                    for c, p in zip(classes, predictions.cnn_probs[i], strict=True)
                }
            )
        if predictions.value_probs:
            values = predictions.value_probs[i]
            row.update(
                {
                    f"values_prob_{c}": "" if values is None else round(float(values[k]), 6)
                    for k, c in enumerate(classes)
                }
            )
        if regions and predictions.region_probs:
            region_probs = predictions.region_probs[i]
            guess = regions[int(np.argmax(region_probs))]
            true_region = predictions.regions[i]
            row["region"] = true_region
            row["region_predicted"] = guess
            row["region_correct"] = int(guess == true_region) if true_region in regions else ""
            row.update(
                {f"region_prob_{r}": round(float(p), 6) for r, p in zip(regions, region_probs, strict=True)}
            )
        rows.append(row)
    return sorted(rows, key=lambda r: (r["shard"], r["key"]))


# ---------------------------------------------------------------- outputs


def write_evaluation(
    out_dir: Path,
    metrics: Mapping[str, Any],
    predictions: SplitPredictions,
    classes: Sequence[str],
    regions: Sequence[str] = (),
) -> dict[str, Path]:
    """metrics.json, confusion_matrix.csv (+ _normalised.csv), confusion_matrix.png, predictions.csv; with a
    body-part head also region_confusion_matrix.csv and .png."""
    from modality.reports.figures import confusion_counts_and_recall

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / "metrics.json"}
    paths["metrics"].write_text(json.dumps(metrics, indent=2) + "\n")
    confusion = metrics["confusion_matrix"]
    paths["confusion_csv"] = write_confusion_csv(
        out_dir / "confusion_matrix.csv", confusion["counts"], classes
    )
    paths["confusion_normalised_csv"] = write_confusion_csv(
        out_dir / "confusion_matrix_normalised.csv", confusion["row_normalised"], classes
    )
    title = f"{metrics.get('split', 'test')} (n={metrics['samples']})"
    paths["confusion_png"] = confusion_counts_and_recall(
        np.asarray(confusion["counts"]), classes, out_dir / "confusion_matrix.png", title
    )
    columns = [
        "key",
        "shard",
        "dataset",
        "body_part",
        "true",
        "predicted",
        "correct",
        *[f"prob_{c}" for c in classes],
    ]
    # Each head's own probabilities (crossval refits the fusion on them) and the simulated-export flag.
    if predictions.exported:
        columns.append("exported")
    if predictions.cnn_probs:
        columns += [f"cnn_prob_{c}" for c in classes]
    if predictions.value_probs:
        columns += [f"values_prob_{c}" for c in classes]
    region_block = metrics.get("region")
    if regions and region_block:
        columns += ["region", "region_predicted", "region_correct", *[f"region_prob_{r}" for r in regions]]
        counts = region_block["confusion_matrix"]["counts"]
        paths["region_confusion_csv"] = write_confusion_csv(
            out_dir / "region_confusion_matrix.csv", counts, regions
        )
        paths["region_confusion_png"] = confusion_counts_and_recall(
            np.asarray(counts),
            regions,
            out_dir / "region_confusion_matrix.png",
            f"{metrics.get('split', 'test')} regions (n={region_block['samples']}, unknown {region_block['unknown']})",
        )
    paths["predictions"] = write_csv(
        out_dir / "predictions.csv", predictions_rows(predictions, classes, regions), columns
    )
    return paths


# ---------------------------------------------------------------- orchestration (called by eval.py)


def _fabric_from_trainer_cfg(trainer_cfg: Mapping[str, Any] | None) -> Any:
    """A Fabric with the trainer config's accelerator/devices/strategy (``trainer=ddp_cpu`` -> 2 CPU ranks)."""
    from lightning_fabric import Fabric

    trainer_cfg = trainer_cfg or {}

    def setting(name: str, default: Any) -> Any:
        # key by key: other trainer keys interpolate Hydra's runtime (default_root_dir) and need not resolve
        value = trainer_cfg.get(name, default)
        return default if value is None else value

    strategy = str(setting("strategy", "auto"))
    # Evaluation syncs nothing per step; spawn variants would pickle this whole process, so plain ddp.
    if strategy.startswith("ddp"):
        strategy = "ddp"
    return Fabric(
        accelerator=setting("accelerator", "auto"),
        devices=setting("devices", "auto"),
        num_nodes=int(setting("num_nodes", 1)),
        strategy=strategy,
        precision="32-true",
    )


def calibrate_on_splits(
    checkpoint: Path, data_dir: Path, splits: Sequence[str], out_path: Path, batch_size: int = 256
) -> FusionCalibration | None:
    """Fit the heads' scales and the fusion weights on ``splits`` of ``data_dir`` (sources the checkpoint did
    not train on) and save them as ``out_path`` (``calibration.json``); None when those splits are empty.

    A training run calls this with its validation split, so its test figures use a fusion chosen without the
    test sources; a refit (trained on every split) gets the calibration fitted on everything its measured run
    had not seen.
    """
    from modality.models.fusion import fit_fusion, stack_arrays
    from modality.shards.listing import plan_split, read_summary

    model, data_info = load_classifier(checkpoint, "cpu")
    summary = read_summary(data_dir / "summary.json")
    merged = SplitPredictions()
    for split in splits:
        urls = plan_split(summary, split, data_dir / "shards").urls
        if urls:
            merged.extend(predict_split(model, data_info, urls, batch_size, fusion="cnn"))
    if not len(merged):
        return None
    classes = [str(c) for c in data_info["classes"]]
    values, answers = stack_arrays(merged.value_probs, len(classes))
    calibration = fit_fusion(
        np.asarray(merged.cnn_probs),
        values,
        answers,
        np.asarray(merged.targets),
        {"checkpoint": str(checkpoint), "splits": list(splits), "datasets": sorted(set(merged.datasets))},
        sources=merged.datasets,
    )
    calibration.save(out_path)
    return calibration


def evaluate_from_config(cfg: Any) -> dict[str, Any] | None:
    """Evaluate a checkpoint on a split of prepared shards and write the outputs (rank 0); returns metrics."""
    from modality.shards.listing import plan_split, read_summary

    source = resolve_checkpoint(str(cfg.ckpt_path))
    data_dir = cfg.get("data_dir") or run_data_dir(source.run_dir)
    if not data_dir:
        raise ValueError(
            f"cannot tell which shards {source.checkpoint} was trained on: pass data_dir=<prepare out_dir>"
        )
    data_dir = Path(str(data_dir))
    split = str(cfg.get("split", "test"))
    summary = read_summary(data_dir / "summary.json")
    shards = plan_split(summary, split, data_dir / "shards")
    if not shards.urls:
        raise ValueError(f"the {split} split of {data_dir} has no shards: nothing to evaluate")

    fabric = _fabric_from_trainer_cfg(cfg.get("trainer"))
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    model, data_info = load_classifier(source.checkpoint, fabric.device)
    classes = [str(c) for c in data_info["classes"]]
    regions = [str(r) for r in data_info.get("regions") or []] if getattr(model, "region_head", None) else []
    if list(summary["classes"]) != classes:
        raise ValueError(f"checkpoint classes {classes} differ from {data_dir}'s {summary['classes']}")

    fusion, cnn_weight = str(cfg.get("fusion", "product")), float(cfg.get("cnn_weight", DEFAULT_CNN_WEIGHT))
    calibration, calibration_path = find_calibration(cfg.get("calibration"), source)
    local = predict_split(
        model,
        data_info,
        shards.urls,
        int(cfg.batch_size),
        rank,
        world,
        fusion,
        cnn_weight,
        calibration,
        simulate_exports=bool(cfg.get("simulate_exports", False)),
    )
    gathered = [local]
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, local)
    if rank != 0:
        fabric.barrier()
        return None

    try:
        merged = SplitPredictions()
        for part in gathered:
            merged.extend(part)
        counts = check_counts(merged, shards.samples)
        counts["per_rank"] = [len(part) for part in gathered]
        metrics: dict[str, Any] = {
            "checkpoint": str(source.checkpoint),
            "run_dir": str(source.run_dir) if source.run_dir else None,
            "data_dir": str(data_dir),
            "split": split,
            "classes": classes,
            "world_size": world,
            "count_check": counts,
            "preprocess_differs_from_checkpoint": preprocess_differences(
                data_info.get("preprocess", {}), summary.get("preprocess", {})
            ),
            **compute_metrics(merged, classes, int(cfg.get("ece_bins", DEFAULT_BINS)), regions),
        }
        # A value head was fused in: say so, and keep the CNN's own score.
        if merged.cnn_probs != merged.probs:
            cnn_only = SplitPredictions(**{**merged.__dict__, "probs": merged.cnn_probs})
            cnn_metrics = compute_metrics(cnn_only, classes, int(cfg.get("ece_bins", DEFAULT_BINS)))
            metrics["fusion"] = {"method": fusion, "cnn_weight": cnn_weight}
            if calibration is not None:
                metrics["fusion"] = {
                    "method": fusion,
                    "calibration": str(calibration_path),
                    **asdict(calibration),
                }
            metrics["cnn_only"] = {
                "accuracy": cnn_metrics["accuracy"],
                "balanced_accuracy": cnn_metrics["balanced_accuracy"],
                "recall": {c: row["recall"] for c, row in cnn_metrics["per_class"].items()},
            }
        timing_cfg = cfg.get("timing") or {}
        if timing_cfg.get("enabled", True) and shards.urls:
            metrics["timing"] = measure_timing(model, data_info, shards.urls, timing_cfg, fabric.device)
        out_dir = output_folder(cfg, source.run_dir / "eval" if source.run_dir else None)
        paths = write_evaluation(out_dir, metrics, merged, classes, regions)
        print(format_console_summary(metrics, paths["metrics"]))
        if not counts["ok"]:
            raise RuntimeError(f"sample count check failed: {counts} (outputs written to {out_dir})")
    finally:
        if world > 1:
            fabric.barrier()  # the other ranks wait here; never leave them hanging on an error
    return metrics


def measure_timing(
    model: torch.nn.Module,
    data_info: Mapping[str, Any],
    urls: Sequence[str],
    timing_cfg: Mapping[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """Forward-pass timing on a real (normalised) test batch tiled to each batch size."""
    from modality.data.batch_transforms import model_inputs

    first = next(split_batches(urls, 16), None)
    if first is None:
        return {"skipped": "no samples"}
    example = model_inputs(first["images"].to(device), data_info)
    batches = time_forward(
        model,
        example,
        [int(b) for b in timing_cfg.get("batch_sizes", (1, 128))],
        warmup=int(timing_cfg.get("warmup", 2)),
        repeats=int(timing_cfg.get("repeats", 10)),
        max_seconds=float(timing_cfg.get("max_seconds", 30.0)),
    )
    return {
        "what": "model forward only, inputs already normalised on the device, warm-up excluded, median of repeats",
        "input_size": int(data_info["input_size"]),
        "batches": batches,
        "hardware": hardware_description(device),
    }


def format_console_summary(metrics: Mapping[str, Any], path: Path) -> str:
    lines = [
        f"{metrics['split']}: {metrics['samples']} samples (expected {metrics['count_check']['expected']}, "
        f"check {'ok' if metrics['count_check']['ok'] else 'FAILED'}), world size {metrics['world_size']}",
        f"accuracy {metrics['accuracy']:.4f}  balanced accuracy {metrics['balanced_accuracy']:.4f}  "
        f"macro-F1 {metrics['macro_f1']:.4f}  ECE {metrics['ece']['value']:.4f}",
    ]
    for dataset, row in metrics["per_dataset"].items():
        lines.append(f"  {dataset}: {row['correct']}/{row['count']} = {row['accuracy']:.3f}")
    region = metrics.get("region")
    if region:
        recalls = ", ".join(
            f"{name} {row['recall']:.3f} (n={row['support']})"
            for name, row in region["per_class"].items()
            if row["support"]
        )
        lines.append(
            f"body-part region ({region['samples']} samples with a known region, {region['unknown']} unknown): "
            f"accuracy {region['accuracy']:.4f}  balanced accuracy {region['balanced_accuracy']:.4f}; "
            f"recall {recalls or 'n/a'}"
        )
    for size, row in metrics.get("timing", {}).get("batches", {}).items():
        lines.append(
            f"  batch {size}: {row['ms_per_image']:.3f} ms/image, {row['images_per_s']:.1f} images/s"
        )
    if metrics["preprocess_differs_from_checkpoint"]:
        lines.append(
            f"WARNING: shards prepared differently from training in {metrics['preprocess_differs_from_checkpoint']}"
        )
    lines.append(f"written: {path}")
    return "\n".join(lines)
