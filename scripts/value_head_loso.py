"""Leave-one-source-out check of the value-statistics head alone, from a prepared pool's shards.

Why: the head (modality/models/value_head.py) fits in about a second, so every source (or source group) of a
pool can be held out in turn, and a choice between recipes can be nested inside the training folds, which no
CNN run here can afford. Each round fits the head on every other source's recorded ``value_features`` exactly
as training does (sources alike within a class, unit-rescaled copies of MR/PET, smaller-export copies,
class-balanced, seed 0) and
predicts the held-out one. Only samples with physical units (DICOM, volumes) are fitted and scored: the head
abstains on PNG/JPEG. Prints per-class recall over all held-out slices, their mean (balanced accuracy) and
every source it gets wrong, for each recipe, and with ``--nested`` the recipe chosen per held-out group by
a grouped 5-fold cross-validation over the OTHER groups (the honest figure for the choice).

Recipes: ``base`` is the head before the stored-peak statistics (the first 11 features, no unit copies);
``peak`` adds them; ``peak+units`` adds the unit-rescaled copies too; ``peak+units+radiographs`` (training's
recipe) adds the training units' 8-bit radiographs as DICOM radiographs (``as_detector_radiographs``); ``float head`` is
training's second head for slices stored as floats (``model.float_value_head``: the first 11 features,
``fraction_non_integer`` zeroed, with the unit copies), scored beside the recipes but never chosen by
``--nested`` for the main head. ``--as-float`` scores every held-out slice as if it had been stored as floats
(NIfTI float32: no stored peak, so both stored-peak statistics read 0); the float head's columns do not change.
``--as-8bit`` scores every held-out slice as if it came as an 8-bit volume (a uint8 NIfTI of a windowed CT/MR/PET,
as image datasets converted from PNG/JPEG stacks are published): its statistics recomputed from the stored
8-bit picture (the percentile window prepare applied, the padding cropped off, the original matrix size), the
stored peak the largest of those 8-bit values. ``--pooled-sources`` fits as training did before
``sources_alike``: every row once, so a big source decides what its class looks like.

    python scripts/value_head_loso.py data/real_shared/prepared_percentile_all [--groups] [--nested] \
        [--as-float | --as-8bit] [--pooled-sources]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from modality.crossval import group_sources, index_samples
from modality.data.value_rows import prepared_value_rows
from modality.intensity.geometry import padded_box
from modality.intensity.value_stats import (
    FLOAT_FEATURES,
    RADIOGRAPH_CLASS,
    UNIT_FREE_CLASSES,
    VALUE_FEATURES,
    float_head_inputs,
    value_features,
)
from modality.models.value_head import ValueStatsHead, fit_float_head, fit_on_training_samples
from modality.shards.listing import read_summary
from modality.shards.reader import read_shard_samples, stored_image

#: recipe -> (feature columns, unit-rescaled copies, 8-bit radiographs as DICOM); the candidates a nested
#: choice picks the main head from
RECIPES = {
    "base": (VALUE_FEATURES.index("log2_columns") + 1, False, False),
    "peak": (len(VALUE_FEATURES), False, False),
    "peak+units": (len(VALUE_FEATURES), True, False),
    "peak+units+radiographs": (len(VALUE_FEATURES), True, True),
}
#: Training's second head for slices stored as floats: scored beside the recipes, never a candidate for the main head.
FLOAT_HEAD = "float head"
Sample = tuple[str, str, int, list[float], str]  # (held-out unit, dataset, class index, value_features, key)


def read_samples(prepared: Path, by_group: bool) -> tuple[list[str], list[Sample], list[Sample]]:
    """(classes, samples with physical units, 8-bit radiographs) over every split's shards; the held-out
    unit is the dataset, or its linked source group (crossval's ``scheme=logo`` groups) with ``by_group``.
    The radiographs are never scored (the head abstains on them); training learns from them as DICOM."""
    classes = list(read_summary(prepared / "summary.json")["classes"])
    group = group_sources(index_samples(prepared)) if by_group else {}
    samples, exports = [], []
    for row in prepared_value_rows(prepared):
        sample = (
            group.get(row.dataset, row.dataset),
            row.dataset,
            classes.index(row.label),
            list(row.features),
            row.key,
        )
        if row.units:
            samples.append(sample)
        elif row.exported_radiograph:
            exports.append(sample)
    return classes, samples, exports


def eight_bit_features(prepared: Path, keys: set[str]) -> dict[str, list[float]]:
    """For each sample in ``keys``: the value statistics of its stored 8-bit picture as if that were an 8-bit
    volume's slice (values 0..255, stored peak their maximum, matrix size the original one). The stored picture
    is the slice through prepare's percentile window, fitted into a square on a 0 background: the padding is
    cropped off again, so only the slice's own values count."""
    out = {}
    for shard in sorted((prepared / "shards").glob("*.tar")):
        for key, members in read_shard_samples(shard):
            if key not in keys:
                continue
            meta = json.loads(members["json"])
            pixels = stored_image(members)
            height, width = (int(v) for v in meta["original_shape"][:2])
            top, left, rows, columns = padded_box(height, width, pixels.shape[0])
            content = pixels[top : top + rows, left : left + columns].astype(np.float32)
            features = value_features(content, stored_peak=int(content.max()))
            features[VALUE_FEATURES.index("log2_rows")] = float(np.log2(height))
            features[VALUE_FEATURES.index("log2_columns")] = float(np.log2(width))
            out[key] = features
    missing = keys - out.keys()
    if missing:
        raise SystemExit(f"{len(missing)} samples have no stored picture in {prepared}/shards")
    return out


def fit_predict(
    classes: list[str],
    train: Sequence[Sample],
    test: Sequence[Sample],
    recipe: str,
    as_float: bool = False,
    exports: Sequence[Sample] = (),
    held_features: dict[str, list[float]] | None = None,
    pooled: bool = False,
) -> list[int]:
    """The recipe's head fitted on ``train`` (and ``exports``, the training units' 8-bit radiographs, where
    the recipe reads them); its answers for ``test`` (``as_float``: as if stored as floats; ``held_features``:
    the test samples' statistics by key, in place of their recorded ones; ``pooled``: every training row
    once instead of sources alike within a class)."""
    unit_free = [i for i, c in enumerate(classes) if c in UNIT_FREE_CLASSES]
    features = np.array([s[3] for s in train], dtype=np.float32)
    labels = np.array([s[2] for s in train])
    sources = None if pooled else [s[1] for s in train]
    held = np.array([held_features[s[4]] if held_features else s[3] for s in test], dtype=np.float32)
    if as_float:
        held[:, len(FLOAT_FEATURES) :] = 0.0  # no stored integers: both stored-peak statistics read 0
    if recipe == FLOAT_HEAD:
        head = ValueStatsHead(len(FLOAT_FEATURES), len(classes))
        fit_float_head(head, features, labels, unit_free, sources)
        held = float_head_inputs(held)
    else:
        columns, units, radiographs = RECIPES[recipe]
        head = ValueStatsHead(columns, len(classes))
        fit_on_training_samples(
            head,
            features[:, :columns],
            labels,
            unit_free if units else [],
            np.array([s[3] for s in exports], dtype=np.float32) if radiographs else None,
            classes.index(RADIOGRAPH_CLASS) if RADIOGRAPH_CLASS in classes else None,
            sources,
        )
        held = held[:, :columns]
    with torch.inference_mode():
        return head(torch.from_numpy(held)).argmax(1).tolist()


def balanced(pairs: Sequence[tuple[int, int]]) -> float:
    """Mean recall over the classes present among the true labels of (true, predicted) pairs."""
    by_class: dict[int, list[bool]] = defaultdict(list)
    for true, guess in pairs:
        by_class[true].append(true == guess)
    return float(np.mean([np.mean(v) for v in by_class.values()])) if by_class else 0.0


def inner_choice(
    classes: list[str],
    samples: Sequence[Sample],
    folds: int = 5,
    exports: Sequence[Sample] = (),
    pooled: bool = False,
) -> str:
    """The recipe with the best pooled balanced accuracy over a grouped ``folds``-fold cross-validation of
    ``samples`` (units dealt round-robin by size, largest first); ties to the earlier recipe."""
    sizes = Counter(s[0] for s in samples)
    order = sorted(sizes, key=lambda u: (-sizes[u], u))
    fold_of = {u: i % folds for i, u in enumerate(order)}
    scores = {}
    for recipe in RECIPES:
        pairs: list[tuple[int, int]] = []
        for k in range(folds):
            train = [s for s in samples if fold_of[s[0]] != k]
            test = [s for s in samples if fold_of[s[0]] == k]
            if test and train:
                inner = [s for s in exports if fold_of.get(s[0], -1) != k]
                guesses = fit_predict(classes, train, test, recipe, exports=inner, pooled=pooled)
                pairs += zip([s[2] for s in test], guesses, strict=True)
        scores[recipe] = balanced(pairs)
    return max(RECIPES, key=lambda r: scores[r])


def leave_one_out(
    classes: list[str],
    samples: list[Sample],
    recipe: str | None,
    as_float: bool = False,
    exports: Sequence[Sample] = (),
    held_features: dict[str, list[float]] | None = None,
    pooled: bool = False,
) -> dict:
    """Each unit held out in turn; ``recipe`` None: chosen inside the training units (:func:`inner_choice`);
    ``as_float``: the held-out slices scored as if stored as floats; ``exports``: 8-bit radiographs, those of
    the training units offered to the recipes that read them; ``held_features``: the held-out slices'
    statistics by key (``--as-8bit``)."""
    confusion: dict[tuple[str, str], Counter] = defaultdict(Counter)
    chosen: dict[str, str] = {}
    for held_out in sorted({s[0] for s in samples}):
        train = [s for s in samples if s[0] != held_out]
        test = [s for s in samples if s[0] == held_out]
        inner = [s for s in exports if s[0] != held_out]
        use = recipe or inner_choice(classes, train, exports=inner, pooled=pooled)
        chosen[held_out] = use
        guesses = fit_predict(classes, train, test, use, as_float, inner, held_features, pooled)
        for sample, guess in zip(test, guesses, strict=True):
            confusion[(sample[1], classes[sample[2]])][classes[guess]] += 1
    recall = {}
    for cls in classes:
        rows = [c for (_, true), c in confusion.items() if true == cls]
        total = sum(sum(c.values()) for c in rows)
        if total:
            recall[cls] = sum(c[cls] for c in rows) / total
    misses = {
        f"{source} {true}": dict(counts)
        for (source, true), counts in sorted(confusion.items())
        if counts[true] != sum(counts.values())
    }
    return {
        "recall": recall,
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "misses": misses,
        "chosen": chosen if recipe is None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared", type=Path)
    parser.add_argument(
        "--groups", action="store_true", help="hold out linked source groups (crossval's logo)"
    )
    parser.add_argument("--nested", action="store_true", help="also choose the recipe inside each fold")
    parser.add_argument("--json", type=Path, default=None)
    stored_as = parser.add_mutually_exclusive_group()
    stored_as.add_argument(
        "--as-float",
        action="store_true",
        help="score held-out slices as if stored as floats (no stored peak)",
    )
    stored_as.add_argument(
        "--as-8bit",
        action="store_true",
        help="score held-out slices as if they came as 8-bit volumes (their stored 8-bit pictures)",
    )
    parser.add_argument(
        "--pooled-sources",
        action="store_true",
        help="fit on every training row once (before sources were weighed alike within a class)",
    )
    args = parser.parse_args()
    classes, samples, exports = read_samples(args.prepared, args.groups)
    held = eight_bit_features(args.prepared, {s[4] for s in samples}) if args.as_8bit else None
    print(
        f"{len(samples)} samples with physical units, {len({s[0] for s in samples})} held-out units, "
        f"{len(exports)} 8-bit radiographs (learnt from as DICOM by the recipes that read them)"
    )
    results = {}
    for recipe in [*RECIPES, FLOAT_HEAD, *(["nested"] if args.nested else [])]:
        result = leave_one_out(
            classes,
            samples,
            None if recipe == "nested" else recipe,
            args.as_float,
            exports,
            held,
            args.pooled_sources,
        )
        results[recipe] = result
        print(f"== {recipe}: balanced accuracy {result['balanced_accuracy']:.3f}")
        print("   recall: " + ", ".join(f"{c} {r:.3f}" for c, r in result["recall"].items()))
        if result["chosen"]:
            print(f"   chosen per held-out unit: {dict(Counter(result['chosen'].values()))}")
        for name, counts in result["misses"].items():
            print(f"     {name}: {counts}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
