"""Leave-one-source-out check of the value-statistics head alone, from a prepared pool's shards.

Why: the head (modality/models/value_head.py) fits in about a second, so every source of a pool can be held out
in turn, which no CNN run here can afford. Each round fits the head on every other source's recorded
``value_features`` exactly as training does (smaller-export copies, class-balanced, seed 0) and predicts the
held-out source. Prints
per-class recall over all held-out slices, their mean (balanced accuracy) and every source it gets wrong.

    python scripts/value_head_loso.py data/real_shared/prepared_percentile_all [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from modality.intensity.value_stats import VALUE_FEATURES
from modality.models.value_head import ValueStatsHead, fit_on_training_samples
from modality.shards.decode import decode_json
from modality.shards.listing import listed_shard_paths, read_summary
from modality.shards.reader import read_shard_samples


def read_samples(prepared: Path) -> tuple[list[str], list[tuple[str, int, list[float]]]]:
    """(classes, [(dataset, class index, value_features)]) over every split's shards."""
    classes = list(read_summary(prepared / "summary.json")["classes"])
    samples = []
    for shard in listed_shard_paths(prepared):
        for _, members in read_shard_samples(shard):
            meta = decode_json(members["json"])
            samples.append((meta["dataset"], classes.index(meta["class"]), meta["value_features"]))
    return classes, samples


def leave_one_source_out(classes: list[str], samples: list[tuple[str, int, list[float]]]) -> dict:
    confusion: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for held_out in sorted({s[0] for s in samples}):
        train = [s for s in samples if s[0] != held_out]
        test = [s for s in samples if s[0] == held_out]
        head = ValueStatsHead(len(VALUE_FEATURES), len(classes))
        fit_on_training_samples(head, np.array([s[2] for s in train]), np.array([s[1] for s in train]))
        with torch.inference_mode():
            predicted = head(torch.tensor([s[2] for s in test], dtype=torch.float32)).argmax(1).tolist()
        for sample, guess in zip(test, predicted, strict=True):
            confusion[(held_out, classes[sample[1]])][classes[guess]] += 1
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
    return {"recall": recall, "balanced_accuracy": float(np.mean(list(recall.values()))), "misses": misses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = leave_one_source_out(*read_samples(args.prepared))
    print("recall: " + ", ".join(f"{c} {r:.3f}" for c, r in result["recall"].items()))
    print(f"balanced accuracy (leave one source out): {result['balanced_accuracy']:.3f}")
    for name, counts in result["misses"].items():
        print(f"  {name}: {counts}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
