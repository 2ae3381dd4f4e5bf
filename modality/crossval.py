"""Multi-source generalisation: leave-one-source-out or grouped K-fold cross-validation over a prepared pool.

Why this exists: a single source-level split gives one number that depends on which sources happened to land
in validation. Holding out every source group in turn and training on the rest gives a mean and a spread, and
the spread is the honest answer to "how well does this transfer to a hospital we have not seen?".

How (``python -m modality.crossval pool=<pool>``):

1. The pool is prepared ONCE (``python -m modality.prepare``): every file is decoded, scaled and stored a
   single time. Folds never decode again: :func:`write_fold_shards` re-routes the stored samples of all splits
   into per-fold ``train``/``val``/``test`` shards by their ``dataset`` field, copying the tar members byte for
   byte, and writes a fold ``summary.json`` with the fold's own counts and exact train statistics.
2. Sources (``dataset`` values) connected by a shared patient id or an identical pixel hash are fused into one
   group (:func:`group_sources`), so no patient and no identical image is ever both trained on and held out.
3. Folds hold out whole groups (:func:`plan_folds`): one group per fold (``scheme=logo``) or groups balanced
   over ``k`` folds (``scheme=group_kfold``).
4. Each fold trains with ``train.py`` in a subprocess (any experiment; the fold's shards replace the data
   dir) and is evaluated with ``eval.py`` on its held-out groups, using the LAST checkpoint: the held-out groups
   also serve as the fold's validation split, so picking the best epoch (or fitting a fusion) on them would be
   optimistic. With ``inner_val=N`` the lightest of N balanced parts of the fold's training groups is held
   back as its validation split instead, and the checkpoint it chooses (best.ckpt) is evaluated: the measured
   run's recipe, nested. eval.py records each head's probabilities; a second pass scores the held-out
   DICOM/volume slices as simulated 8-bit exports.
5. :func:`summarise_folds` gives mean +- std over folds of accuracy, balanced accuracy and per-class recall,
   plus pooled figures over every held-out prediction. A class that a fold never trained on (its only source
   was held out) cannot be recalled by any model; its samples are reported under ``untrainable`` and left out of
   that fold's metrics rather than silently counted as errors or silently dropped.
6. :func:`nested_decisions` scores the CNN alone, the value head alone and the fused decision with a fusion
   fitted, for each fold, on the other folds' held-out predictions only (nested); ``calibration.json`` is fitted
   on every fold (rewritten after each fold, so it is partial until the run ends). Per-source balanced accuracy
   names the worst source.
7. A rerun with the same settings (``fold.json``: held-out sources, overrides) reuses finished folds; with
   only other evaluation settings (``eval_overrides``, ``exports``) it evaluates each trained checkpoint
   again instead of training the fold again (:data:`TRAINING_KEYS`).
8. With a body-part head (``'train_overrides=[..., "model.body_part=true"]'``), eval.py's region columns give
   the region figures beside the modality ones (:func:`summarise_regions`): accuracy and balanced accuracy
   per fold and over folds, recall per region, pooled; held-out images whose region is unknown are counted,
   not scored, and a region the fold never trained on is reported as untrainable like a class.
9. Every decision is also scored per series (:func:`series_results`: the vote ``eval.py input=`` gives), and
   the fused decision's confidence is calibrated per slice and per series by maps chosen and fitted on the
   other folds (:func:`confidence_summary`); the maps and "unknown" thresholds fitted on every fold go into
   ``calibration.json``.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modality.metrics.calibration import (
    ConfidenceMap,
    abstention_threshold,
    answer_ece,
    answer_reliability,
    classwise_ece,
    coverage_accuracy,
    fit_confidence_map,
    group_votes,
)
from modality.models.fusion import FusionCalibration, decisions, fit_fusion, stack_arrays
from modality.paths import PROJECT_ROOT
from modality.shards import policy
from modality.shards.decode import decode_json
from modality.shards.listing import listed_shard_paths
from modality.shards.policy import SPLITS
from modality.shards.reader import read_shard_samples, stored_image
from modality.shards.stats import histogram_stats
from modality.shards.writer import ShardWriter


@dataclass(frozen=True)
class StoredSample:
    """What crossval needs to know about one sample already in the prepared shards."""

    shard: str  # shard file name under shards/
    key: str
    dataset: str
    cls: str
    patient_id: str
    pixel_hash: str
    series: str = ""  # SeriesInstanceUID, else the source file (a volume, an image): the unit a series answer votes over


@dataclass
class FoldPlan:
    """The groups held out by one fold and the sources they contain."""

    index: int
    held_out_groups: list[str]
    held_out_datasets: list[str]
    train_datasets: list[str]
    # sources of training groups held back as the fold's validation split (``inner_val``): the checkpoint is
    # chosen on them, never on the held-out groups; empty: the last checkpoint is evaluated
    val_datasets: list[str] = field(default_factory=list)


@dataclass
class FoldResult:
    """Held-out predictions of one fold (true and predicted class names, plus their dataset)."""

    index: int
    held_out_groups: list[str]
    true: list[str]
    predicted: list[str]
    datasets: list[str]
    train_classes: list[str]
    status: str = "ok"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Each head's held-out probabilities (eval.py's cnn_prob_* / values_prob_* columns); None rows: the value
    # head abstained. Empty when the runner gave classes only.
    cnn_probs: list[list[float]] = field(default_factory=list)
    value_probs: list[list[float] | None] = field(default_factory=list)
    # The same held-out slices scored as simulated 8-bit exports (None: not a DICOM/volume slice)
    export_predicted: list[str | None] = field(default_factory=list)
    # Body-part head: each held-out sample's recorded region (``unknown`` allowed) and the head's answer,
    # and the regions the fold trained on; empty without the head
    regions_true: list[str] = field(default_factory=list)
    regions_predicted: list[str] = field(default_factory=list)
    train_regions: list[str] = field(default_factory=list)
    # each held-out row's series (StoredSample.series, through eval's key column); empty when unknown
    series: list[str] = field(default_factory=list)

    def subset(self, rows: Sequence[int], predicted: Sequence[str] | None = None) -> FoldResult:
        """These rows of the fold (true class, dataset), scored by ``predicted`` (default: the fold's own)."""
        return FoldResult(
            self.index,
            self.held_out_groups,
            [self.true[i] for i in rows],
            list(predicted) if predicted is not None else [self.predicted[i] for i in rows],
            [self.datasets[i] for i in rows],
            self.train_classes,
        )


@dataclass
class FoldPredictions:
    """What a fold runner returns: per held-out sample its true class, the scored prediction, its dataset,
    and (when the model has them) each head's probabilities."""

    true: list[str]
    predicted: list[str]
    datasets: list[str]
    cnn_probs: list[list[float]] = field(default_factory=list)
    value_probs: list[list[float] | None] = field(default_factory=list)
    export_predicted: list[str | None] = field(default_factory=list)  # see FoldResult
    regions_true: list[str] = field(default_factory=list)  # see FoldResult
    regions_predicted: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # eval's sample keys, in row order


# ---------------------------------------------------------------------------------------------- reading shards


def index_samples(prepared_dir: Path) -> list[StoredSample]:
    """Read the metadata of every stored sample (json members only; pixels are not decoded)."""
    samples = []
    for shard in listed_shard_paths(prepared_dir):
        for key, members in read_shard_samples(shard):
            meta = decode_json(members.get("json", b"{}"))
            samples.append(
                StoredSample(
                    shard=shard.name,
                    key=key,
                    dataset=str(meta.get("dataset", "")),
                    cls=str(meta.get("class", "")),
                    patient_id=str(meta.get("patient_id") or ""),
                    # shards written before 2026-11-28 recorded a SHA-1 under another name
                    pixel_hash=str(meta.get("pixel_hash") or meta.get("pixel_sha1") or ""),
                    series=str(meta.get("series_uid") or meta.get("source_path") or key),
                )
            )
    return samples


# ------------------------------------------------------------------------------------------- grouping sources


def group_sources(samples: Iterable[StoredSample]) -> dict[str, str]:
    """Map each dataset to a group name; datasets sharing a patient id or a pixel hash share a group.

    A group is named after its first dataset (sorted), plus how many others are linked to it: dataset names
    often contain ``+`` already (``owner+repo``), so joining them would be ambiguous; ``plan.json`` lists every
    member. Placeholder patient ids do not link sources
    (:func:`~modality.shards.policy.is_placeholder_patient_id`); identical pixels always do.
    """
    datasets: dict[str, None] = {}
    shared: list[tuple[str, str]] = []
    for sample in samples:
        datasets.setdefault(sample.dataset)
        if not policy.is_placeholder_patient_id(sample.patient_id):
            shared.append((sample.dataset, "patient:" + sample.patient_id))
        if sample.pixel_hash:
            shared.append((sample.dataset, "pixels:" + sample.pixel_hash))
    root = policy.connected_groups(datasets, shared)
    members: dict[str, list[str]] = defaultdict(list)
    for dataset, group in root.items():
        members[group].append(dataset)
    return {dataset: group_name(members[root[dataset]]) for dataset in root}


def group_name(datasets: Sequence[str]) -> str:
    """``site_a`` for a lone source, ``site_a (+2 linked)`` for a group of three."""
    first, *others = sorted(datasets)
    return f"{first} (+{len(others)} linked)" if others else first


def plan_folds(
    group_sizes: dict[str, int], scheme: str = "group_kfold", k: int = 5, seed: int = 0
) -> list[list[str]]:
    """Assign whole groups to folds; each group is held out exactly once.

    ``logo`` holds out one group per fold. ``group_kfold`` places groups, largest first, into the fold that
    holds the fewest samples so far (ties broken by a seeded order), which keeps folds comparable in size.
    """
    groups = sorted(group_sizes)
    if not groups:
        raise ValueError("no source groups to cross-validate: the prepared pool holds no samples")
    if scheme == "logo":
        return [[group] for group in groups]
    if scheme != "group_kfold":
        raise ValueError(f"unknown crossval scheme {scheme!r}: use 'logo' or 'group_kfold'")
    if k < 2:
        raise ValueError(f"group_kfold needs k >= 2, got {k}")
    if k > len(groups):
        raise ValueError(
            f"group_kfold with k={k} but only {len(groups)} source groups: lower k or use scheme=logo"
        )
    rng = np.random.default_rng(seed)
    tie_break = {group: float(r) for group, r in zip(groups, rng.random(len(groups)), strict=True)}
    order = sorted(groups, key=lambda g: (-group_sizes[g], tie_break[g]))
    folds: list[list[str]] = [[] for _ in range(k)]
    loads = [0] * k
    for group in order:
        target = min(range(k), key=lambda i: (loads[i], i))
        folds[target].append(group)
        loads[target] += group_sizes[group]
    return [sorted(fold) for fold in folds]


def build_fold_plans(
    samples: Sequence[StoredSample], scheme: str, k: int, seed: int, inner_val: int = 0
) -> list[FoldPlan]:
    """Group the pool's sources and turn the fold assignment into per-fold dataset lists.

    ``inner_val`` = N > 1: each fold's training groups are split into N balanced parts (the ``group_kfold``
    rule) and the lightest part becomes the fold's validation split, so that the checkpoint is chosen on
    sources the fold does not train on and that are not its held-out ones: the measured run's recipe (train,
    pick the best epoch on unseen sources), nested. 0: no validation split (the final model's recipe)."""
    group_of = group_sources(samples)
    sizes = Counter(group_of[s.dataset] for s in samples)
    plans = []
    for index, held_out in enumerate(plan_folds(dict(sizes), scheme=scheme, k=k, seed=seed)):
        held = set(held_out)
        val: set[str] = set()
        if inner_val > 1:
            rest = {g: n for g, n in sizes.items() if g not in held}
            parts = plan_folds(rest, scheme="group_kfold", k=min(inner_val, len(rest)), seed=seed)
            val = set(min(parts, key=lambda part: (sum(rest[g] for g in part), part)))
        plans.append(
            FoldPlan(
                index=index,
                held_out_groups=held_out,
                held_out_datasets=sorted(d for d, g in group_of.items() if g in held),
                train_datasets=sorted(d for d, g in group_of.items() if g not in held and g not in val),
                val_datasets=sorted(d for d, g in group_of.items() if g in val),
            )
        )
    return plans


# --------------------------------------------------------------------------------------------- fold shards


def split_of_dataset(plan: FoldPlan) -> dict[str, str]:
    """Fold split per dataset: train, the inner validation sources (``val``), the held-out ones (``test``)."""
    split = {d: "train" for d in plan.train_datasets}
    split.update({d: "val" for d in plan.val_datasets})
    split.update({d: "test" for d in plan.held_out_datasets})
    return split


def write_fold_shards(
    prepared_dir: Path, fold_dir: Path, plan: FoldPlan, shard_max_samples: int = 2000
) -> dict[str, Any]:
    """Route every stored sample of the pool into this fold's shards and write its summary.json.

    Held-out samples go to both ``val`` and ``test`` (validation drives logging only; evaluation uses the
    last checkpoint, see the module docstring). The pool's own summary supplies classes and preprocessing,
    so the fold's checkpoints carry exactly the preprocessing the samples were stored with.
    """
    base = json.loads((prepared_dir / "summary.json").read_text())
    classes: list[str] = list(base["classes"])
    routes = split_of_dataset(plan)
    shards_dir = fold_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    for stale in shards_dir.glob("*.tar*"):
        stale.unlink()
    writers = {split: ShardWriter(shards_dir, split, shard_max_samples) for split in SPLITS}
    by_class: dict[str, Counter] = {s: Counter() for s in SPLITS}
    by_dataset: dict[str, dict[str, Counter]] = {s: defaultdict(Counter) for s in SPLITS}
    by_body_part: dict[str, dict[str, Counter]] = {s: defaultdict(Counter) for s in SPLITS}
    by_region: dict[str, Counter] = {s: Counter() for s in SPLITS}
    histogram = np.zeros(256, dtype=np.int64)
    for shard in listed_shard_paths(prepared_dir):
        for key, members in read_shard_samples(shard):
            meta = decode_json(members.get("json", b"{}"))
            dataset = str(meta.get("dataset", ""))
            if dataset not in routes:
                raise ValueError(f"{shard.name}:{key} has dataset {dataset!r}, which no fold plan lists")
            cls = str(meta.get("class") or classes[int(members["cls"])])
            # without an inner validation split the held-out samples are the val split too (logging only:
            # the last checkpoint is evaluated, see the module docstring)
            targets = [routes[dataset]]
            if routes[dataset] == "test" and not plan.val_datasets:
                targets = ["val", "test"]
            for split in targets:
                writers[split].write(key, sorted(members.items()))
                by_class[split][cls] += 1
                by_dataset[split][dataset][cls] += 1
                by_body_part[split][cls][str(meta.get("body_part", "unknown"))] += 1
                by_region[split][str(meta.get("region", "unknown"))] += 1
            if routes[dataset] == "train":
                histogram += np.bincount(stored_image(members).ravel(), minlength=256)
    for writer in writers.values():
        writer.close()
    summary = {key: value for key, value in base.items() if key not in ("splits", "stats")}
    summary["splits"] = {
        split: {
            "samples": sum(by_class[split].values()),
            "shards": [asdict(info) for info in writers[split].shards],
            "by_class": dict(by_class[split]),
            "by_dataset": {d: dict(c) for d, c in by_dataset[split].items()},
            "by_body_part": {c: dict(b) for c, b in by_body_part[split].items()},
            "by_region": dict(sorted(by_region[split].items())),
        }
        for split in SPLITS
    }
    summary["stats"] = {"train": histogram_stats(histogram)}
    summary["crossval"] = {
        "fold": plan.index,
        "held_out_groups": plan.held_out_groups,
        "held_out_datasets": plan.held_out_datasets,
        "train_datasets": plan.train_datasets,
        "val_datasets": plan.val_datasets,
        "source_prepared_dir": str(prepared_dir),
    }
    tmp = fold_dir / "summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, fold_dir / "summary.json")
    return summary


# ------------------------------------------------------------------------------------------------- metrics


def fold_metrics(result: FoldResult, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy and per-class recall of one fold over classes the fold trained on."""
    trained = set(result.train_classes)
    pairs = [(t, p) for t, p in zip(result.true, result.predicted, strict=True) if t in trained]
    untrainable = Counter(t for t in result.true if t not in trained)
    recall = {}
    support = {}
    for cls in classes:
        hits = [p == t for t, p in pairs if t == cls]
        support[cls] = len(hits)
        if hits:
            recall[cls] = sum(hits) / len(hits)
    return {
        "fold": result.index,
        "held_out_groups": result.held_out_groups,
        "status": result.status,
        "error": result.error,
        "samples": len(pairs),
        "acc": (sum(t == p for t, p in pairs) / len(pairs)) if pairs else None,
        "balanced_acc": (sum(recall.values()) / len(recall)) if recall else None,
        "recall": recall,
        "support": support,
        "untrainable": dict(untrainable),
    }


def _mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


def summarise_folds(results: Sequence[FoldResult], classes: Sequence[str]) -> dict[str, Any]:
    """Mean +- sample std over folds, and pooled metrics over all held-out predictions.

    Folds weigh equally in the mean (each is one "new hospital"); the pooled figures weigh every held-out
    image equally. Both are reported because a large source can dominate one and vanish in the other.
    """
    per_fold = [fold_metrics(r, classes) for r in results]
    ok = [m for m in per_fold if m["status"] == "ok" and m["samples"]]
    pooled = FoldResult(
        index=-1,
        held_out_groups=[],
        true=[t for r in results if r.status == "ok" for t, _ in _trainable_pairs(r)],
        predicted=[p for r in results if r.status == "ok" for _, p in _trainable_pairs(r)],
        datasets=[],
        train_classes=list(classes),
    )
    pooled_metrics = fold_metrics(pooled, classes)
    confusion = {t: {p: 0 for p in classes} for t in classes}
    for t, p in zip(pooled.true, pooled.predicted, strict=True):
        if t in confusion and p in confusion[t]:
            confusion[t][p] += 1
    return {
        "classes": list(classes),
        "folds": per_fold,
        "failed_folds": [m["fold"] for m in per_fold if m["status"] != "ok"],
        "acc": _mean_std([m["acc"] for m in ok]),
        "balanced_acc": _mean_std([m["balanced_acc"] for m in ok]),
        "recall": {c: _mean_std([m["recall"][c] for m in ok if c in m["recall"]]) for c in classes},
        "pooled": {
            "samples": pooled_metrics["samples"],
            "acc": pooled_metrics["acc"],
            "balanced_acc": pooled_metrics["balanced_acc"],
            "recall": pooled_metrics["recall"],
            "support": pooled_metrics["support"],
            "confusion": confusion,
        },
        "untrainable": dict(sum((Counter(m["untrainable"]) for m in per_fold), Counter())),
    }


def summarise_regions(results: Sequence[FoldResult], regions: Sequence[str]) -> dict[str, Any] | None:
    """The body-part head's figures beside the modality ones: per fold, mean +- std over folds and pooled
    accuracy, balanced accuracy and recall per region, over held-out images whose region is known and was
    trained on; unknown and untrainable regions are counted apart. None when no fold has region answers."""
    with_regions = [r for r in results if r.status == "ok" and r.regions_predicted]
    if not with_regions:
        return None
    names = list(regions) or sorted({t for r in with_regions for t in r.regions_true if t != "unknown"})
    as_folds = []
    unknown = 0
    for r in with_regions:
        known = [i for i, t in enumerate(r.regions_true) if t in names]
        unknown += len(r.regions_true) - len(known)
        as_folds.append(
            FoldResult(
                r.index,
                r.held_out_groups,
                [r.regions_true[i] for i in known],
                [r.regions_predicted[i] for i in known],
                [r.datasets[i] for i in known],
                r.train_regions or names,
            )
        )
    summary = summarise_folds(as_folds, names)
    summary["unknown"] = unknown
    return summary


def _trainable_pairs(result: FoldResult) -> list[tuple[str, str]]:
    trained = set(result.train_classes)
    return [(t, p) for t, p in zip(result.true, result.predicted, strict=True) if t in trained]


def _fmt(stat: dict[str, Any]) -> str:
    if stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f} (n={stat['n']})"


def format_summary(summary: dict[str, Any]) -> str:
    """Markdown tables: one row per fold, then mean ± std and pooled figures."""
    classes = summary["classes"]
    head = "| fold | held out | n | acc | balanced acc | " + " | ".join(f"recall {c}" for c in classes) + " |"
    lines = [
        "Each fold's own eval.py answer (the fixed fusion rule: a fold's calibration is fitted afterwards, below):",
        "",
        head,
        "|" + "---|" * (5 + len(classes)),
    ]
    for m in summary["folds"]:
        cells = [
            str(m["fold"]),
            ", ".join(m["held_out_groups"]) + ("" if m["status"] == "ok" else f" (FAILED: {m['error']})"),
            str(m["samples"]),
            *_fold_scores(m, classes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"- accuracy over folds: {_fmt(summary['acc'])}")
    lines.append(f"- balanced accuracy over folds: {_fmt(summary['balanced_acc'])}")
    for c in classes:
        lines.append(f"- recall {c} over folds: {_fmt(summary['recall'][c])}")
    pooled = summary["pooled"]
    if pooled["acc"] is not None:
        recalls = _pooled_recalls(pooled, classes)
        lines.append(
            f"- pooled over {pooled['samples']} held-out images: accuracy {pooled['acc']:.3f}, "
            f"balanced accuracy {pooled['balanced_acc']:.3f}; recall {recalls}"
        )
    if summary["untrainable"]:
        lines.append(
            "- held-out images of a class the fold never trained on (excluded above): "
            + ", ".join(f"{c} {n}" for c, n in sorted(summary["untrainable"].items()))
        )
    if summary.get("decisions"):
        lines += ["", _format_decisions(summary["decisions"], classes)]
    if summary.get("region"):
        lines += ["", _format_regions(summary["region"], summary)]
    if summary.get("exports"):
        ex = summary["exports"]
        lines.append(
            f"\n- DICOM/volume slices of the held-out folds as read (fused) vs as simulated 8-bit exports: "
            f"accuracy {ex['acc_as_read']:.3f} vs {ex['acc_exported']:.3f} (n={ex['samples']}; per fold: "
            + ", ".join(f"{f['fold']}: {f['acc_as_read']:.3f}/{f['acc_exported']:.3f}" for f in ex["folds"])
            + ")"
        )
        if ex.get("support"):  # runs summarised before per-class export recall was recorded have none
            lines.append(
                "- per class, recall as read / as exports: "
                + ", ".join(
                    f"{c} {ex['recall_as_read'][c]:.3f} / {ex['recall_exported'][c]:.3f} (n={n})"
                    for c, n in ex["support"].items()
                )
            )
    if summary.get("confidence"):
        lines += ["", _format_confidence(summary["confidence"])]
    return "\n".join(lines)


def _format_confidence(conf: Mapping[str, Any]) -> str:
    """The fused decision's calibration and its "unknown" answer, per slice and per series (issue 19)."""
    target = conf["target_accuracy"]
    lines = [
        "Confidence of the fused decision on held-out sources (nested calibration; series = the vote eval.py "
        "input= gives: majority of slices; stated confidence = a slice's top probability, a series' mean "
        "probability of the voted class; calibrated = through a confidence map fitted on the other folds):",
        "",
        f"| level | n | accuracy | ECE stated | ECE calibrated | 'unknown' below a calibrated threshold fitted on "
        f"the other folds (target {target:.2f}): coverage | accuracy of what is answered |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in ("slice", "series"):
        row = conf.get(level)
        if row is None:
            continue
        nested = row["unknown_nested"]
        answered = nested["accuracy_answered"]
        lines.append(
            f"| {level} | {row['n']} | {row['accuracy']:.3f} | {row['ece']:.3f} | {row['ece_calibrated']:.3f} "
            f"(map in {row.get('folds_mapped', '-')} folds) | "
            f"{nested['coverage']:.3f} | {'-' if answered is None else f'{answered:.3f}'} |"
        )
    series = conf.get("series") or {}
    if "slice_accuracy_per_series" in series:
        lines += [
            "",
            f"- the vote against its own slices, every series weighted alike: series accuracy "
            f"{series['accuracy']:.3f}, their slices' mean accuracy {series['slice_accuracy_per_series']:.3f} "
            f"(the pooled slice accuracy above weighs each series by its slice count)",
        ]
    per_class = ", ".join(f"{c} {e:.3f}" for c, e in conf["slice"]["ece_per_class"].items())
    final = conf["final_thresholds"]
    lines += [
        "",
        f"- class-wise ECE per slice (each class's probability column): {per_class}",
        "- thresholds fitted on every fold (calibration.json unknown_below_*, on the calibrated confidence): "
        + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in final.items()),
        "- confidence map fitted on every fold (calibration.json slice_confidence = series_confidence): "
        + "; ".join(
            f"sigmoid({m['slope']:.3f} logit(c) + {m['intercept']:.3f})"
            for m in [(conf.get("confidence_maps") or {}).get("slice")]
            if m
        ),
        "",
        "| calibrated confidence >= | slice coverage | slice accuracy | series coverage | series accuracy |",
        "|---|---|---|---|---|",
    ]
    series_rows = conf["series"]["coverage_at"] if conf.get("series") else []
    blank = {"coverage": 0.0, "accuracy": None}
    for a, b in itertools.zip_longest(conf["slice"]["coverage_at"], series_rows, fillvalue=blank):
        acc_a = "-" if a["accuracy"] is None else f"{a['accuracy']:.3f}"
        acc_b = "-" if b["accuracy"] is None else f"{b['accuracy']:.3f}"
        cov_b = "-" if b is blank else f"{b['coverage']:.3f}"
        lines.append(f"| {a['threshold']:.2f} | {a['coverage']:.3f} | {acc_a} | {cov_b} | {acc_b} |")
    return "\n".join(lines)


def _fold_scores(
    fold: Mapping[str, Any], names: Sequence[str], beside: Sequence[float | None] = ()
) -> list[str]:
    """A fold's table cells: accuracy, balanced accuracy, any ``beside`` figures, then recall (support) per
    name; the same columns for the modality table and the body-part head's."""
    rates = [fold["acc"], fold["balanced_acc"], *beside]
    cells = ["n/a" if x is None else f"{x:.3f}" for x in rates]
    return cells + [
        f"{fold['recall'][n]:.2f} ({fold['support'][n]})" if n in fold["recall"] else "-" for n in names
    ]


def _pooled_recalls(pooled: Mapping[str, Any], names: Sequence[str]) -> str:
    return ", ".join(
        f"{n} {pooled['recall'][n]:.3f} (n={pooled['support'][n]})" for n in names if n in pooled["recall"]
    )


def _format_regions(region: Mapping[str, Any], modality: Mapping[str, Any]) -> str:
    """The body-part head per fold (region accuracy, balanced accuracy, recall per region) with the modality
    balanced accuracy of the same fold beside it, then over folds and pooled."""
    names = region["classes"]
    modality_by_fold = {m["fold"]: m for m in modality["folds"]}
    lines = [
        "Body-part head (held-out images with a known region; modality balanced accuracy of the same fold beside):",
        "",
        "| fold | n | region acc | region balanced acc | modality balanced acc | "
        + " | ".join(f"recall {r}" for r in names)
        + " |",
        "|" + "---|" * (5 + len(names)),
    ]
    for m in region["folds"]:
        other = modality_by_fold.get(m["fold"], {}).get("balanced_acc")
        cells = [
            str(m["fold"]),
            str(m["samples"]),
            *_fold_scores(m, names, beside=[other]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"- region accuracy over folds: {_fmt(region['acc'])}")
    lines.append(f"- region balanced accuracy over folds: {_fmt(region['balanced_acc'])}")
    for r in names:
        if region["recall"][r]["n"]:
            lines.append(f"- recall {r} over folds: {_fmt(region['recall'][r])}")
    pooled = region["pooled"]
    if pooled["acc"] is not None:
        recalls = _pooled_recalls(pooled, names)
        lines.append(
            f"- region pooled over {pooled['samples']} held-out images: accuracy {pooled['acc']:.3f}, "
            f"balanced accuracy {pooled['balanced_acc']:.3f}; recall {recalls}"
        )
    lines.append(f"- held-out images with an unknown region (not scored): {region['unknown']}")
    if region["untrainable"]:
        lines.append(
            "- held-out images of a region the fold never trained on (excluded above): "
            + ", ".join(f"{r} {n}" for r, n in sorted(region["untrainable"].items()))
        )
    return "\n".join(lines)


def _format_decisions(decided: Mapping[str, Any], classes: Sequence[str]) -> str:
    """One row per decision (nested calibration): balanced accuracy over folds, worst fold and source, pooled
    balanced accuracy and per-class recall."""
    head = (
        "| decision (nested calibration) | balanced acc over folds | worst fold | worst source | pooled balanced acc | "
        + " | ".join(f"recall {c}" for c in classes)
        + " |"
    )
    lines = [head, "|" + "---|" * (5 + len(classes))]
    for name, entry in decided.items():
        folds = [f["balanced_acc"] for f in entry["folds"] if f["balanced_acc"] is not None]
        worst = entry.get("worst_source")
        pooled = entry["pooled"]
        cells = [
            _decision_name(name),
            _fmt(entry["balanced_acc"]),
            f"{min(folds):.3f}" if folds else "n/a",
            f"{worst['dataset']} {worst['balanced_acc']:.3f} (n={worst['samples']})" if worst else "n/a",
            *_pooled_cells(pooled, classes, ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    with_series = {name: entry["series"] for name, entry in decided.items() if entry.get("series")}
    if with_series:
        lines += [
            "",
            "Per series (the vote eval.py input= gives: one answer per DICOM series or volume file):",
            "",
            "| decision, per series | balanced acc over folds | pooled balanced acc | "
            + " | ".join(f"recall {c}" for c in classes)
            + " |",
            "|" + "---|" * (3 + len(classes)),
        ]
        for name, entry in with_series.items():
            cells = [
                _decision_name(name),
                _fmt(entry["balanced_acc"]),
                *_pooled_cells(entry["pooled"], classes, " series"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _decision_name(name: str) -> str:
    return name + (" (rows it answers)" if name == "values" else "")


def _pooled_cells(pooled: Mapping[str, Any], classes: Sequence[str], unit: str) -> list[str]:
    """A decision table's pooled balanced accuracy (with its count of ``unit``) and per-class recall cells."""
    balanced = pooled["balanced_acc"]
    cells = ["n/a" if balanced is None else f"{balanced:.3f} (n={pooled['samples']}{unit})"]
    return cells + [f"{pooled['recall'][c]:.3f}" if c in pooled["recall"] else "-" for c in classes]


# --------------------------------------------------------------------------------------------- train / eval


def _run(cmd: Sequence[str], log_path: Path, timeout_s: float | None) -> None:
    """Run one child process with its output in a log file; raise with the log's tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(
            list(cmd), cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
        )
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {proc.returncode}:\n{tail}")


def train_and_evaluate_fold(
    fold_dir: Path,
    train_overrides: Sequence[str],
    eval_overrides: Sequence[str],
    timeout_s: float | None = None,
    exports: bool = True,
    resume: bool = True,
) -> FoldPredictions:
    """Train on the fold's shards with train.py, evaluate its last checkpoint with eval.py on the held-out split.

    Returns the held-out predictions read from eval.py's predictions.csv (each head's probabilities included).
    """
    run_dir = fold_dir / "run"
    eval_dir = fold_dir / "eval"
    # What the fold's outputs depend on: a rerun reuses them only when all of it is the same.
    split = json.loads((fold_dir / "summary.json").read_text()).get("crossval", {})
    fingerprint = {
        "held_out_datasets": split.get("held_out_datasets"),
        "train_datasets": split.get("train_datasets"),
        "val_datasets": split.get("val_datasets") or [],
        "train_overrides": list(train_overrides),
        "eval_overrides": list(eval_overrides),
        "exports": bool(exports),
    }
    previous = _read_fingerprint(fold_dir) if resume else None
    if previous == fingerprint:
        done = finished_fold(fold_dir, exports)
        if done is not None:
            print(
                f"[crossval] {fold_dir.name}: reusing its finished predictions (resume=false retrains)",
                flush=True,
            )
            return done
    same_training = previous is not None and all(previous.get(k) == fingerprint[k] for k in TRAINING_KEYS)
    if previous != fingerprint:
        # Evaluations made under other settings go first: a run killed before the new ones are written must
        # not find them beside a fingerprint that says they are the new ones.
        for stale in (eval_dir / "predictions.csv", fold_dir / "eval_export" / "predictions.csv"):
            stale.unlink(missing_ok=True)
        (fold_dir / FINGERPRINT_NAME).write_text(json.dumps(fingerprint, indent=2))
    if same_training and trained_fold(run_dir):
        if previous != fingerprint:
            print(
                f"[crossval] {fold_dir.name}: same training, other evaluation settings: evaluating its "
                "checkpoint again",
                flush=True,
            )
    else:
        _run(
            [
                sys.executable,
                "train.py",
                *train_overrides,
                f"data.data_dir={fold_dir}",
                "data.prepare_dataset=null",
                "refit.train_splits=null",  # a refit would train on the held-out groups (the fold's val split)
                "calibration_splits=null",  # the fold's val split is its held-out data: fitted below, nested
                f"hydra.run.dir={run_dir}",
            ],
            fold_dir / "train.log",
            timeout_s,
        )
    # with an inner validation split (training groups held back), the checkpoint it chose; else the last
    ckpt = run_dir / "checkpoints" / ("best.ckpt" if split.get("val_datasets") else "last.ckpt")
    if not ckpt.exists():
        raise RuntimeError(f"training finished without {ckpt}")
    _run(
        [
            sys.executable,
            "eval.py",
            f"ckpt_path={ckpt}",
            f"data_dir={fold_dir}",
            f"out={eval_dir}",
            "calibration=none",  # the fold's fusion is fitted afterwards on the other folds (nested)
            *eval_overrides,
        ],
        fold_dir / "eval.log",
        timeout_s,
    )
    got = read_predictions(eval_dir / "predictions.csv")
    if exports:  # the same held-out slices again, as simulated 8-bit exports (issue 14's robustness check)
        export_dir = fold_dir / "eval_export"
        _run(
            [
                sys.executable,
                "eval.py",
                f"ckpt_path={ckpt}",
                f"data_dir={fold_dir}",
                f"out={export_dir}",
                "calibration=none",
                "simulate_exports=true",
                *eval_overrides,
            ],
            fold_dir / "eval_export.log",
            timeout_s,
        )
        got.export_predicted = read_export_predictions(export_dir / "predictions.csv")
    prune_periodic_checkpoints(run_dir / "checkpoints")
    return got


def prune_periodic_checkpoints(checkpoints: Path) -> list[Path]:
    """Delete the periodic ``epoch_*.ckpt`` of a scored fold's training run; ``best.ckpt`` and ``last.ckpt``
    stay (a rerun reuses or resumes from them). Why: a fold of ``experiment=real_shared`` writes four
    checkpoints of ~128 MB, so one 19-fold LOGO run held ~11 GB and filled this machine's disk mid-run
    (2026-12-07); the periodic ones serve an interrupted single training run, which a scored fold no longer is."""
    removed = sorted(checkpoints.glob("epoch_*.ckpt"))
    for path in removed:
        path.unlink()
    return removed


#: The settings a fold's outputs were made with (held-out sources, overrides): resume compares them.
FINGERPRINT_NAME = "fold.json"
#: The part of the fingerprint the trained checkpoint depends on: when only the rest (eval overrides, the
#: export pass) changes, a rerun evaluates the finished checkpoint again instead of training the fold again.
TRAINING_KEYS = ("held_out_datasets", "train_datasets", "val_datasets", "train_overrides")


def _read_fingerprint(fold_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((fold_dir / FINGERPRINT_NAME).read_text())
    except (OSError, ValueError):
        return None


def trained_fold(run_dir: Path) -> bool:
    """True when the fold's training run finished (run_summary.json says ok and last.ckpt exists): a rerun
    then only evaluates it."""
    try:
        status = json.loads((run_dir / "run_summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return False
    return status == "ok" and (run_dir / "checkpoints" / "last.ckpt").is_file()


def finished_fold(fold_dir: Path, exports: bool) -> FoldPredictions | None:
    """A fold's predictions when an earlier run finished it (its eval outputs, with each head's columns, and
    the export pass when asked for), else None. Lets a killed or partly failed crossval rerun only what is
    missing; the fold's shards are rewritten identically either way."""
    predictions = fold_dir / "eval" / "predictions.csv"
    exported = fold_dir / "eval_export" / "predictions.csv"
    checkpoint = fold_dir / "run" / "checkpoints" / "last.ckpt"
    if not predictions.is_file() or not checkpoint.is_file() or (exports and not exported.is_file()):
        return None
    if any(p.is_file() and p.stat().st_mtime < checkpoint.stat().st_mtime for p in (predictions, exported)):
        return None  # trained again since it was evaluated
    got = read_predictions(predictions)
    if not got.cnn_probs:
        return None  # written before eval recorded each head's probabilities
    if exports:
        got.export_predicted = read_export_predictions(exported)
    return got


def read_predictions(path: Path) -> FoldPredictions:
    """eval.py's predictions.csv: true/predicted/dataset, and each head's probabilities where written."""
    out = FoldPredictions([], [], [])
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        cnn_cols = [f for f in fields if f.startswith("cnn_prob_")]
        value_cols = [f for f in fields if f.startswith("values_prob_")]
        with_regions = "region_predicted" in fields  # a model with a body-part head
        with_keys = "key" in fields  # older eval outputs have none: then no series figures
        for row in reader:
            if with_keys:
                out.keys.append(row["key"])
            out.true.append(row["true"])
            out.predicted.append(row["predicted"])
            out.datasets.append(row.get("dataset", ""))
            if with_regions:
                out.regions_true.append(row["region"])
                out.regions_predicted.append(row["region_predicted"])
            if cnn_cols:
                out.cnn_probs.append([float(row[c]) for c in cnn_cols])
            if value_cols:
                cells = [row[c] for c in value_cols]
                out.value_probs.append(None if any(c == "" for c in cells) else [float(c) for c in cells])
    return out


def read_export_predictions(path: Path) -> list[str | None]:
    """Per row of a ``simulate_exports=true`` predictions.csv: the prediction where the slice was exported."""
    with open(path, newline="") as handle:
        return [row["predicted"] if row.get("exported") == "1" else None for row in csv.DictReader(handle)]


#: The probability blocks of an eval.py predictions.csv: the fused answer's, the CNN's, the value head's.
PROBABILITY_BLOCKS = ("prob_", "cnn_prob_", "values_prob_")


def _probability_blocks(path: Path) -> tuple[list[str], dict[str, list[list[float] | None]]]:
    """(keys, rows per block) of an eval.py predictions.csv, read once: a row is None where its block is empty
    (the value head abstained)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {b: [f for f in reader.fieldnames or [] if f.startswith(b)] for b in PROBABILITY_BLOCKS}
        missing = [b for b, cols in columns.items() if not cols]
        if missing:
            raise ValueError(f"{path} has no {', '.join(b + '*' for b in missing)} columns")
        keys: list[str] = []
        rows: dict[str, list[list[float] | None]] = {b: [] for b in PROBABILITY_BLOCKS}
        for row in reader:
            keys.append(row["key"])
            for block, cols in columns.items():
                cells = [row[c] for c in cols]
                rows[block].append(None if any(c == "" for c in cells) else [float(c) for c in cells])
    return keys, rows


def _mean_rows(members: Sequence[list[list[float] | None]], what: str) -> list[list[float] | None]:
    """Row-wise mean of the members' probability rows; a row must be present in all or in none."""
    out: list[list[float] | None] = []
    for cells in zip(*members, strict=True):
        present = [c is not None for c in cells]
        if any(present) and not all(present):
            raise ValueError(f"the ensemble's members disagree on which rows have {what} probabilities")
        out.append(np.mean(np.asarray(cells, dtype=np.float64), axis=0).tolist() if all(present) else None)
    return out


def ensemble_fold(
    fold_dir: Path, members: Sequence[Path], classes: Sequence[str], exports: bool
) -> FoldPredictions:
    """A fold scored as the mean of the probabilities of finished cross-validation runs (``members``: their
    ``out_dir``), nothing trained: each head's probabilities averaged row by row, the ensemble's own answer the
    class of the highest mean fused probability (on the export pass too). Every member must have finished this
    fold on the same held-out sources and the same rows, so the ensemble is scored exactly where they were.
    Body-part regions are not carried."""
    held_out = (
        json.loads((fold_dir / "summary.json").read_text()).get("crossval", {}).get("held_out_datasets")
    )
    passes = ("eval", "eval_export") if exports else ("eval",)
    blocks: dict[tuple[str, str], list[list[list[float] | None]]] = {}
    keys: dict[str, list[str]] = {}
    first: FoldPredictions | None = None
    for member in members:
        member_fold = Path(member) / fold_dir.name
        got = finished_fold(member_fold, exports)
        fingerprint = _read_fingerprint(member_fold) or {}
        if got is None or fingerprint.get("held_out_datasets") != held_out:
            raise ValueError(f"{member_fold} is not a finished fold holding out {held_out}")
        first = first or got
        if got.true != first.true or got.datasets != first.datasets:
            raise ValueError(f"{member_fold} scored other rows than {Path(members[0]) / fold_dir.name}")
        for name in passes:
            row_keys, rows = _probability_blocks(member_fold / name / "predictions.csv")
            if keys.setdefault(name, row_keys) != row_keys:
                raise ValueError(f"{member_fold / name} lists other samples than the first member")
            for block, block_rows in rows.items():
                blocks.setdefault((name, block), []).append(block_rows)
    if first is None:
        raise ValueError("an ensemble needs at least one member run")
    mean = {key: _mean_rows(rows, key[1].rstrip("_")) for key, rows in blocks.items()}
    cnn_probs = mean[("eval", "cnn_prob_")]
    if any(row is None for row in cnn_probs):
        raise ValueError(f"a member of the ensemble has rows without CNN probabilities in {fold_dir.name}")

    def answers(name: str) -> list[str]:
        return [classes[int(np.argmax(row))] if row is not None else "" for row in mean[(name, "prob_")]]

    export_predicted: list[str | None] = []
    if exports:
        exported = [e is not None for e in first.export_predicted]
        export_predicted = [a if e else None for a, e in zip(answers("eval_export"), exported, strict=True)]
    return FoldPredictions(
        first.true,
        answers("eval"),
        first.datasets,
        cnn_probs=[row for row in cnn_probs if row is not None],
        value_probs=mean[("eval", "values_prob_")],
        export_predicted=export_predicted,
        keys=keys["eval"],
    )


FoldRunner = Callable[[Path], FoldPredictions | tuple[list[str], list[str], list[str]]]


def run_crossval(
    prepared_dir: Path,
    out_dir: Path,
    runner: FoldRunner,
    scheme: str = "group_kfold",
    k: int = 5,
    seed: int = 0,
    shard_max_samples: int = 2000,
    folds: Sequence[int] | None = None,
    unknown_target_accuracy: float = 0.95,
    inner_val: int = 0,
) -> dict[str, Any]:
    """Plan folds over the prepared pool, write each fold's shards, run it, and summarise.

    ``runner(fold_dir)`` trains and evaluates one fold (:func:`train_and_evaluate_fold` in the CLI; tests pass
    a stand-in). A failing fold is recorded with its error and does not stop the others.
    """
    samples = index_samples(prepared_dir)
    series_of = {sample.key: sample.series for sample in samples}
    pool_summary = json.loads((prepared_dir / "summary.json").read_text())
    classes = pool_summary["classes"]
    regions = list(pool_summary.get("regions") or [])
    plans = build_fold_plans(samples, scheme=scheme, k=k, seed=seed, inner_val=inner_val)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.json").write_text(json.dumps([plan.__dict__ for plan in plans], indent=2))
    results = []
    for plan in plans:
        if folds is not None and plan.index not in folds:
            continue
        fold_dir = out_dir / f"fold_{plan.index:02d}"
        summary = write_fold_shards(prepared_dir, fold_dir, plan, shard_max_samples)
        train_classes = sorted(c for c, n in summary["splits"]["train"]["by_class"].items() if n)
        train_regions = sorted(
            r for r, n in summary["splits"]["train"]["by_region"].items() if n and r in regions
        )
        print(
            f"[crossval] fold {plan.index}: hold out {', '.join(plan.held_out_groups)} "
            f"({summary['splits']['test']['samples']} images); train on {summary['splits']['train']['samples']}"
            + (
                f", choose the checkpoint on {summary['splits']['val']['samples']}"
                if plan.val_datasets
                else ""
            ),
            flush=True,
        )
        try:
            got = runner(fold_dir)
            if not isinstance(got, FoldPredictions):
                got = FoldPredictions(*got)
            result = FoldResult(
                plan.index,
                plan.held_out_groups,
                got.true,
                got.predicted,
                got.datasets,
                train_classes,
                cnn_probs=got.cnn_probs,
                value_probs=got.value_probs,
                export_predicted=got.export_predicted,
                regions_true=got.regions_true,
                regions_predicted=got.regions_predicted,
                train_regions=train_regions,
                series=[series_of.get(key, key) for key in got.keys]
                if len(got.keys) == len(got.true)
                else [],
            )
        except Exception as error:  # one broken fold must not hide the others' results
            result = FoldResult(
                plan.index,
                plan.held_out_groups,
                [],
                [],
                [],
                train_classes,
                status="failed",
                error=str(error)[-500:],
            )
            print(f"[crossval] fold {plan.index} FAILED: {str(error)[-500:]}", file=sys.stderr, flush=True)
        results.append(result)
        _write_results(out_dir, results, classes, regions, unknown_target_accuracy)
    return _write_results(out_dir, results, classes, regions, unknown_target_accuracy)


#: The answers reported side by side: the CNN alone, the value head alone (on the samples it answers), and
#: the fused decision users get. Each is calibrated by the fold's nested calibration.
DECISIONS = ("cnn", "values", "fused")


def _has_probabilities(result: FoldResult) -> bool:
    return result.status == "ok" and bool(result.true) and len(result.cnn_probs) == len(result.true)


def _fold_arrays(
    result: FoldResult, classes: Sequence[str], trainable_only: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row indices, targets, cnn probs, value probs, value-head answered) of a fold's held-out samples."""
    index = {c: i for i, c in enumerate(classes)}
    trained = set(result.train_classes)
    rows = np.array(
        [i for i, t in enumerate(result.true) if t in index and (t in trained or not trainable_only)],
        dtype=int,
    )
    values = result.value_probs or [None] * len(result.true)
    value_probs, answers = stack_arrays([values[i] for i in rows], len(classes))
    cnn = np.asarray([result.cnn_probs[i] for i in rows], dtype=np.float64).reshape(len(rows), len(classes))
    targets = np.asarray([index[result.true[i]] for i in rows], dtype=np.int64)
    return rows, targets, cnn, value_probs, answers


def _fit_on(results: Sequence[FoldResult], classes: Sequence[str], note: str) -> FusionCalibration:
    """A calibration fitted on these folds' held-out predictions (each fold's trainable classes only: a class
    a fold never saw says nothing about how to weigh the heads)."""
    parts = [_fold_arrays(r, classes, trainable_only=True) for r in results]
    sources = [r.datasets[i] for r, p in zip(results, parts, strict=True) for i in p[0]]
    return fit_fusion(
        np.concatenate([p[2] for p in parts]),
        np.concatenate([p[3] for p in parts]),
        np.concatenate([p[4] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        {"folds": [r.index for r in results], "note": note},
        sources=sources,
        # the rule is chosen by leaving one of these folds out at a time: nested inside the outer fold
        groups=[r.index for r, p in zip(results, parts, strict=True) for _ in p[0]],
    )


def nested_decisions(
    results: Sequence[FoldResult], classes: Sequence[str]
) -> tuple[dict[str, list[FoldResult]], dict[int, dict[str, Any]], FusionCalibration] | None:
    """Per fold, the three decisions under a calibration fitted on the OTHER folds' held-out predictions.

    The other folds' held-out sources are exactly this fold's training sources, so nothing about the held-out
    source chooses how its answer is made (nested). Also returns the calibration fitted on every fold, the one
    a model trained on all sources should use. None when fewer than two folds carry probabilities.
    """
    usable = [r for r in results if _has_probabilities(r)]
    if len(usable) < 2:
        return None
    per_decision: dict[str, list[FoldResult]] = {d: [] for d in DECISIONS}
    fitted: dict[int, dict[str, Any]] = {}
    for result in usable:
        others = [o for o in usable if o is not result]
        try:
            calibration = _fit_on(others, classes, f"nested: fitted without fold {result.index}")
        except ValueError as error:  # the other folds hold no trainable held-out row yet
            fitted[result.index] = {"error": str(error)}
            continue
        fitted[result.index] = asdict(calibration)
        rows, _, cnn, values, answers = _fold_arrays(result, classes, trainable_only=False)
        outputs = decisions(calibration, cnn, values, answers)
        for name in DECISIONS:
            keep = answers if name == "values" else np.ones(len(rows), dtype=bool)
            predicted = outputs[name][keep].argmax(axis=1) if keep.any() else np.zeros(0, int)
            decided = result.subset(rows[keep], [classes[int(k)] for k in predicted])
            decided.extra["probs"] = outputs[name][keep]  # calibrated: what confidence is read from
            if len(result.series) == len(result.true):
                decided.series = [result.series[i] for i in rows[keep]]
            per_decision[name].append(decided)
    if not per_decision["fused"]:
        return None
    return per_decision, fitted, _fit_on(usable, classes, "every fold's held-out predictions")


def series_results(folds: Sequence[FoldResult], classes: Sequence[str]) -> list[FoldResult]:
    """The same decision per series: each fold's held-out slices grouped by series and voted by the rule
    ``eval.py input=`` gives curators (:func:`modality.metrics.calibration.vote`: majority of the slices'
    answers, ties to the higher mean probability), the series' true class the majority of its slices'. One
    row per series, so a 79-slice volume counts once, as one answer. Folds without series ids or
    probabilities are left out."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for fold in folds:
        probs = fold.extra.get("probs")
        if probs is None or len(fold.series) != len(fold.true) or not fold.true:
            continue
        rows = [i for i, t in enumerate(fold.true) if t in index]
        if not rows:
            continue
        p = np.asarray(probs, dtype=np.float64)[rows]
        targets = np.asarray([index[fold.true[i]] for i in rows], dtype=np.int64)
        groups = [fold.series[i] for i in rows]
        voted, _, target, names = group_votes(p, targets, groups)
        dataset_of = {fold.series[i]: fold.datasets[i] for i in rows}
        out.append(
            FoldResult(
                fold.index,
                fold.held_out_groups,
                [classes[int(t)] for t in target],
                [classes[int(v)] for v in voted],
                [dataset_of[n] for n in names],
                fold.train_classes,
            )
        )
    return out


def _confidence_rows(
    result: FoldResult, classes: Sequence[str], trainable_only: bool
) -> dict[str, np.ndarray] | None:
    """A fused fold's slice and series answers as arrays: confidence, correct, target, and the series votes
    (:func:`modality.metrics.calibration.group_votes`: the rule ``eval.py input=`` votes by)."""
    probs = result.extra.get("probs")
    if probs is None or len(probs) != len(result.true) or not result.true:
        return None
    index = {c: i for i, c in enumerate(classes)}
    trained = set(result.train_classes)
    rows = [i for i, t in enumerate(result.true) if t in index and (t in trained or not trainable_only)]
    if not rows:
        return None
    p = np.asarray(probs, dtype=np.float64)[rows]
    targets = np.asarray([index[result.true[i]] for i in rows], dtype=np.int64)
    out = {
        "probs": p,
        "targets": targets,
        "confidence": p.max(axis=1),
        "correct": p.argmax(axis=1) == targets,
    }
    if len(result.series) == len(result.true):  # eval's key column mapped to series; else no series figures
        groups = [result.series[i] for i in rows]
        voted, out["series_confidence"], series_target, names = group_votes(p, targets, groups)
        out["series_correct"] = voted == series_target
        sizes = Counter(groups)
        right = Counter(g for g, ok in zip(groups, out["correct"], strict=True) if ok)
        out["series_slice_accuracy"] = np.asarray([right[n] / sizes[n] for n in names], dtype=np.float64)
    return out


def _threshold(
    parts: Sequence[Mapping[str, np.ndarray]], conf: str, correct: str, target: float, mapping: ConfidenceMap
) -> float | None:
    """The "unknown" threshold fitted on ``parts`` (held-out answers of training folds) on the calibrated
    confidence ``mapping`` gives them; None without any."""
    if not parts:
        return None
    return abstention_threshold(
        np.concatenate([_mapped(f, conf, mapping) for f in parts]),
        np.concatenate([f[correct] for f in parts]),
        target,
    )


def _mapped(part: Mapping[str, np.ndarray], conf: str, mapping: ConfidenceMap) -> np.ndarray:
    """A fold's stated confidences at one level (``confidence`` or ``series_confidence``) through a map."""
    return mapping(part[conf])


def _fit_map(parts: Sequence[Mapping[str, np.ndarray]]) -> ConfidenceMap:
    """The slice confidence map fitted on ``parts`` (training folds' held-out answers); identity if none."""
    if not parts:
        return ConfidenceMap()
    return fit_confidence_map(
        np.concatenate([f["confidence"] for f in parts]), np.concatenate([f["correct"] for f in parts])
    )


def _chosen_map(parts: Sequence[Mapping[str, np.ndarray]]) -> ConfidenceMap:
    """The confidence map of a model trained on the sources of ``parts``: fitted on their held-out slice
    answers, or the identity, whichever calibrates their slices better by leave-one-fold-out (each part scored
    by a map fitted on the others; ECE pooled over the parts). Series are read through the same map.

    Why a choice: a map fitted on other sources helps only where the held-out source errs as they do. Under
    leave-one-source-out on the shared corpus one source (1,422 brain PET slices, 7% right) once made every
    slice-level map wrong for the rest and the rest's map wrong for it; the choice is made on the training
    folds only.

    Why no map of its own for series: the corpus holds 254 series and its wrong series are almost all single
    images (14 of 15 in the 19-fold LOGO run of 2026-12-06), and a one-slice series IS a slice. A series map
    fitted on them (logit of the mean probability plus log slice count) mostly learnt how many images the
    other folds' sources have per series: with the 55 single-image X-ray series of one source held out it
    stated 0.72 for answers that were all right; series ECE 0.077 nested against 0.035 through the slice map
    (docs/results.md, where the choice between them is discussed: made after seeing both)."""
    if len(parts) < 2:
        return ConfidenceMap()
    mapped, stated, right = [], [], []
    for i, part in enumerate(parts):
        mapping = _fit_map([q for j, q in enumerate(parts) if j != i])
        mapped.append(mapping(part["confidence"]))
        stated.append(part["confidence"])
        right.append(part["correct"])
    ok = np.concatenate(right)
    if answer_ece(np.concatenate(mapped), ok) < answer_ece(np.concatenate(stated), ok):
        return _fit_map(parts)
    return ConfidenceMap()


def confidence_summary(
    fused: Sequence[FoldResult], classes: Sequence[str], target_accuracy: float
) -> dict[str, Any] | None:
    """How far the fused decision's confidence can be trusted on held-out sources (issue 19), per slice and per
    series: accuracy per slice vs per series; ECE of the stated confidence (a slice's top probability, a
    series vote's mean probability) and of the calibrated one (for each fold one :class:`ConfidenceMap`, read
    by both levels, fitted on the OTHER folds' held-out slice answers, or the identity where those folds' own
    leave-one-fold-out says the map calibrates worse: :func:`_chosen_map`); and an "unknown" answer below a
    calibrated confidence threshold chosen the same way: the lowest at which the other folds' answers reach
    ``target_accuracy`` (coverage and accuracy of what this fold still answers). The maps and thresholds
    fitted on every fold are the ones a final model uses (calibration.json).

    Nested once: fold i's map and threshold never see fold i's answers, but the other folds' probabilities they
    are fitted on were calibrated by fusions whose fitting folds include i (the calibration of each fold
    excludes that fold only). Series figures need eval's key column (mapped to series); without it, none."""
    folds = {
        r.index: (_confidence_rows(r, classes, False), _confidence_rows(r, classes, True)) for r in fused
    }
    folds = {k: v for k, v in folds.items() if v[0] is not None}
    if len(folds) < 2:
        return None
    every = [v[0] for v in folds.values()]
    probs = np.concatenate([f["probs"] for f in every])
    targets = np.concatenate([f["targets"] for f in every])
    levels = [("slice", "confidence", "correct")]
    if all("series_confidence" in f for f in every):
        levels.append(("series", "series_confidence", "series_correct"))
    out: dict[str, Any] = {"target_accuracy": target_accuracy, "series": None}
    trainable = [v[1] for v in folds.values() if v[1] is not None]
    out["final_thresholds"] = {"slice": None, "series": None}
    out["confidence_maps"] = {"slice": None, "series": None}
    # One confidence map per fold, fitted on slices and read by both levels: a series' mean probability of
    # its voted class goes through the same map as a slice's top probability (see _chosen_map for why).
    fold_maps = {
        index: _chosen_map([v[1] for k, v in folds.items() if k != index and v[1] is not None])
        for index in folds
    }
    final_map = _chosen_map(trainable)
    for level, conf, correct in levels:
        c = np.concatenate([f[conf] for f in every])
        ok = np.concatenate([f[correct] for f in every])
        nested_rows, calibrated, calibrated_ok, mapped_folds = [], [], [], 0
        for index, (held, _) in folds.items():
            others = [v[1] for k, v in folds.items() if k != index and v[1] is not None]
            mapping = fold_maps[index]
            mapped_folds += int(mapping.answers > 0)
            held_conf = _mapped(held, conf, mapping)
            calibrated.append(held_conf)
            calibrated_ok.append(held[correct])
            threshold = _threshold(others, conf, correct, target_accuracy, mapping)
            if threshold is not None:
                nested_rows.append({"fold": index, **coverage_accuracy(held_conf, held[correct], threshold)})
        nested_c, nested_ok = np.concatenate(calibrated), np.concatenate(calibrated_ok)
        answered = sum(r["answered"] for r in nested_rows)
        total = sum(r["rows"] for r in nested_rows)
        right = sum((r["accuracy"] or 0.0) * r["answered"] for r in nested_rows)
        out[level] = {
            "n": len(c),
            "accuracy": float(ok.mean()),
            "ece": answer_ece(c, ok),
            "reliability": [row for row in answer_reliability(c, ok) if row["count"]],
            "ece_calibrated": answer_ece(nested_c, nested_ok),
            "folds_mapped": mapped_folds,  # folds whose inner choice took the fitted map (else the identity)
            "reliability_calibrated": [
                row for row in answer_reliability(nested_c, nested_ok) if row["count"]
            ],
            "unknown_nested": {
                "folds": nested_rows,
                "coverage": answered / total if total else 0.0,
                "accuracy_answered": right / answered if answered else None,
            },
            "coverage_at": [
                coverage_accuracy(nested_c, nested_ok, t) for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
            ],
        }
        if level == "series":
            # Per series against per slice on the same footing: the slice accuracy with every series
            # weighted alike (pooled slices are dominated by the long volumes, which are easy here).
            out[level]["slice_accuracy_per_series"] = float(
                np.concatenate([f["series_slice_accuracy"] for f in every]).mean()
            )
        out["confidence_maps"][level] = final_map.to_dict()
        out["final_thresholds"][level] = _threshold(trainable, conf, correct, target_accuracy, final_map)
    out["slice"]["ece_per_class"] = dict(zip(classes, classwise_ece(probs, targets), strict=True))
    return out


def export_comparison(
    results: Sequence[FoldResult], fused: Sequence[FoldResult], classes: Sequence[str]
) -> dict[str, Any] | None:
    """Per fold and pooled: accuracy on the held-out DICOM/volume slices as read (the fused decision) and as
    simulated 8-bit exports (where the value head abstains), over the classes each fold trained on; pooled
    per class too (``recall_as_read``, ``recall_exported``, ``support``), because one class's slices can
    dominate the pooled accuracy (the 1,422 brain-PET slices of the shared corpus move it by 0.35 alone)."""
    by_index = {r.index: r for r in fused}
    folds = []
    right_as_read: dict[str, int] = dict.fromkeys(classes, 0)
    right_exported: dict[str, int] = dict.fromkeys(classes, 0)
    support: dict[str, int] = dict.fromkeys(classes, 0)
    for result in results:
        decided = by_index.get(result.index)
        if decided is None or not (len(result.export_predicted) == len(decided.true) == len(result.true)):
            continue  # the fused decision keeps every row in order; anything else cannot be compared
        trained = set(result.train_classes)
        rows = [
            i for i, p in enumerate(result.export_predicted) if p is not None and result.true[i] in trained
        ]
        if not rows:
            continue
        as_read = sum(decided.predicted[i] == result.true[i] for i in rows) / len(rows)
        exported = sum(result.export_predicted[i] == result.true[i] for i in rows) / len(rows)
        for i in rows:
            truth = result.true[i]
            support[truth] += 1
            right_as_read[truth] += decided.predicted[i] == truth
            right_exported[truth] += result.export_predicted[i] == truth
        folds.append(
            {"fold": result.index, "samples": len(rows), "acc_as_read": as_read, "acc_exported": exported}
        )
    if not folds:
        return None
    total = sum(f["samples"] for f in folds)
    return {
        "folds": folds,
        "acc_as_read": sum(f["acc_as_read"] * f["samples"] for f in folds) / total,
        "acc_exported": sum(f["acc_exported"] * f["samples"] for f in folds) / total,
        "samples": total,
        "recall_as_read": {c: right_as_read[c] / n for c, n in support.items() if n},
        "recall_exported": {c: right_exported[c] / n for c, n in support.items() if n},
        "support": {c: n for c, n in support.items() if n},
    }


def per_source_metrics(results: Sequence[FoldResult], classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Balanced accuracy of each held-out source (dataset) over the classes its fold trained on."""
    out: dict[str, dict[str, Any]] = {}
    for result in results:
        if result.status != "ok":
            continue
        for dataset in sorted(set(result.datasets)):
            rows = [i for i, d in enumerate(result.datasets) if d == dataset]
            metrics = fold_metrics(result.subset(rows), classes)
            if metrics["samples"]:
                out[dataset] = {
                    "fold": result.index,
                    "samples": metrics["samples"],
                    "balanced_acc": metrics["balanced_acc"],
                    "acc": metrics["acc"],
                    "recall": metrics["recall"],
                }
    return out


#: Sources with fewer held-out images than this are listed per source but not named "worst": a single-image
#: source (the corpus has six) scores 0 or 1 and says nothing about a site.
MIN_SOURCE_SAMPLES = 10


def _worst(per_source: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    sized = {d: m for d, m in per_source.items() if m["samples"] >= MIN_SOURCE_SAMPLES}
    if not sized:
        return None
    name = min(sized, key=lambda d: (sized[d]["balanced_acc"], d))
    return {"dataset": name, **sized[name]}


def _write_results(
    out_dir: Path,
    results: Sequence[FoldResult],
    classes: Sequence[str],
    regions: Sequence[str] = (),
    unknown_target_accuracy: float = 0.95,
) -> dict[str, Any]:
    """crossval.json + crossval.md after every fold, so an interrupted run keeps what it measured; with head
    probabilities, also the nested decisions and ``calibration.json`` (fitted on every fold); with a body-part
    head, the ``region`` figures."""
    summary = summarise_folds(results, classes)
    region = summarise_regions(results, regions)
    if region is not None:
        summary["region"] = region
    summary["per_source"] = per_source_metrics(results, classes)
    summary["worst_source"] = _worst(summary["per_source"])
    nested = nested_decisions(results, classes)
    if nested is not None:
        per_decision, fitted, final = nested
        summary["decisions"] = {}
        for name, folds in per_decision.items():
            decided = summarise_folds(folds, classes)
            decided["per_source"] = per_source_metrics(folds, classes)
            decided["worst_source"] = _worst(decided["per_source"])
            by_series = series_results(folds, classes)
            if by_series:
                decided["series"] = summarise_folds(by_series, classes)
                decided["series"]["per_source"] = per_source_metrics(by_series, classes)
            summary["decisions"][name] = decided
        summary["exports"] = export_comparison(results, per_decision["fused"], classes)
        confidence = confidence_summary(per_decision["fused"], classes, unknown_target_accuracy)
        if confidence is not None:
            summary["confidence"] = confidence
            final.unknown_below_slice = confidence["final_thresholds"]["slice"]
            final.unknown_below_series = confidence["final_thresholds"]["series"]
            final.unknown_target_accuracy = unknown_target_accuracy
            final.slice_confidence = confidence["confidence_maps"]["slice"]
            final.series_confidence = confidence["confidence_maps"]["series"]
        summary["nested_calibrations"] = {str(k): v for k, v in fitted.items()}
        summary["calibration"] = asdict(final)
        final.save(out_dir / "calibration.json")
    (out_dir / "crossval.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "crossval.md").write_text(format_summary(summary) + "\n")
    with open(out_dir / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        if region is None:
            writer.writerow(["fold", "dataset", "true", "predicted"])
        else:
            writer.writerow(["fold", "dataset", "true", "predicted", "region", "region_predicted"])
        for r in results:
            rows = [[r.index, d, t, p] for t, p, d in zip(r.true, r.predicted, r.datasets, strict=True)]
            if region is not None:
                true_regions = r.regions_true or [""] * len(rows)
                guessed = r.regions_predicted or [""] * len(rows)
                rows = [[*row, a, b] for row, a, b in zip(rows, true_regions, guessed, strict=True)]
            writer.writerows(rows)
    return summary


# ------------------------------------------------------------------------------------------------------ CLI


def fold_train_overrides(train_overrides: Sequence[str], seed: int | None) -> list[str]:
    """What each fold's train.py gets: ``train_overrides`` with the training ``seed`` (None: the experiment's).

    ``seed`` once set only the fold plan, so ``seed=1`` trained every fold at the experiment's seed 0 and gave a
    second copy of the seed-0 run where a second seed was meant (2026-12-07). A seed given both ways must agree.
    """
    overrides = list(train_overrides)
    if seed is None:
        return overrides
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"crossval seed must be an integer or null, got {seed!r}")
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("seed=")]
    if any(value != str(seed) for value in given):
        raise ValueError(
            f"crossval seed={seed} and train_overrides {overrides} name different training seeds: give one"
        )
    return overrides if given else [*overrides, f"seed={seed}"]


def crossval_from_config(cfg: Any) -> dict[str, Any]:
    """Prepare the pool if needed, then cross-validate it as ``cfg`` says (configs/crossval.yaml)."""
    from modality.prepare import build_in_subprocess, is_prepared

    prepared_dir = Path(cfg.prepared_dir)
    if not is_prepared(prepared_dir):
        print(f"[crossval] preparing {cfg.pool} into {prepared_dir}", flush=True)
    # Also when prepared: prepare refuses a folder whose stored preprocessing differs from the request.
    build_in_subprocess(cfg.pool, prepared_dir, list(cfg.prepare_overrides))
    train_overrides = fold_train_overrides(cfg.train_overrides, cfg.get("seed"))
    eval_overrides = list(cfg.eval_overrides)
    members = [Path(m) for m in cfg.get("ensemble") or []]
    classes = json.loads((prepared_dir / "summary.json").read_text())["classes"]

    def runner(fold_dir: Path) -> FoldPredictions:
        if members:
            return ensemble_fold(fold_dir, members, classes, bool(cfg.get("exports", True)))
        return train_and_evaluate_fold(
            fold_dir,
            train_overrides,
            eval_overrides,
            cfg.timeout_s,
            bool(cfg.get("exports", True)),
            bool(cfg.get("resume", True)),
        )

    summary = run_crossval(
        prepared_dir,
        Path(cfg.out_dir),
        runner,
        scheme=cfg.scheme,
        k=int(cfg.k),
        seed=int(cfg.get("plan_seed", 0)),
        shard_max_samples=int(cfg.shard_max_samples),
        folds=None if cfg.folds is None else [int(f) for f in cfg.folds],
        unknown_target_accuracy=float(cfg.get("unknown_target_accuracy", 0.95)),
        inner_val=int(cfg.get("inner_val", 0) or 0),
    )
    print(format_summary(summary))
    print(f"[crossval] results in {Path(cfg.out_dir).resolve()}/crossval.json and crossval.md")
    return summary


def main() -> None:
    """Hydra entry point: ``python -m modality.crossval pool=<pool> scheme=logo|group_kfold k=5``."""
    import hydra

    from modality.paths import CONFIG_DIR

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="crossval")
    def _app(cfg: Any) -> None:
        crossval_from_config(cfg)

    _app()


if __name__ == "__main__":
    main()
