"""The fused decision of a leave-one-group-out run on its held-out slices as if they had been stored as floats.

Why: a slice stored as floating point (float32 NIfTI, as PET and scaled MR volumes are often published) has no
stored integers, so the value head's two stored-peak statistics read 0, and the shared corpus holds no such
slice: the LOGO run itself never meets the case. This rebuilds each fold's decision from what the run stored,
without training anything: the fold's CNN probabilities (``fold_XX/eval/predictions.csv``), its nested
calibration (``crossval.json``'s ``nested_calibrations``: fitted on the other folds only), and the fold's two
value heads refitted on the other groups' recorded statistics exactly as training fits them (deterministic,
full batch). As stored it reproduces the run's fused figures; as floats it shows what the main head, the float
head, and the two fusion rules do there.

    python scripts/fused_as_floats.py outputs/crossval/real_shared_logo_peak data/real_shared/prepared_percentile_all
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from modality.data.value_rows import prepared_value_rows
from modality.intensity.value_stats import (
    FLOAT_FEATURES,
    RADIOGRAPH_CLASS,
    UNIT_FREE_CLASSES,
    VALUE_FEATURES,
    float_head_inputs,
)
from modality.models.fusion import FusionCalibration
from modality.models.value_head import ValueStatsHead, fit_float_head, fit_on_training_samples

#: decision -> (value head, fusion rule); the CNN alone is added beside them.
DECISIONS = {
    "as stored: main head, the calibration's rule": ("stored", "calibrated"),
    "as floats: main head, the calibration's rule": ("main as float", "calibrated"),
    "as floats: float head, the calibration's rule": ("float head", "calibrated"),
    "as floats: float head, product rule (eval.py's)": ("float head", "product"),
}


def recorded_features(
    prepared: Path, classes: list[str]
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, str], dict[str, list[float]]]:
    """Every sample with physical units: its recorded value statistics, class index and source, by sample
    key; and the statistics of the 8-bit radiographs (which training's main head learns from as DICOM), by key."""
    features, labels, sources, exports = {}, {}, {}, {}
    for row in prepared_value_rows(prepared):
        if row.units:
            features[row.key] = list(row.features)
            labels[row.key] = classes.index(row.label)
            sources[row.key] = row.dataset
        elif row.exported_radiograph:
            exports[row.key] = list(row.features)
    return features, labels, sources, exports


def fitted_heads(
    x: np.ndarray,
    y: np.ndarray,
    sources: list[str],
    unit_free: list[int],
    exports: np.ndarray,
    xr: int | None,
    n: int,
) -> tuple[ValueStatsHead, ...]:
    """The main and the float value head, fitted as training fits them."""
    main = ValueStatsHead(len(VALUE_FEATURES), n)
    fit_on_training_samples(main, x, y, unit_free, exports, xr, sources)
    floats = ValueStatsHead(len(FLOAT_FEATURES), n)
    fit_float_head(floats, x, y, unit_free, sources)
    return main, floats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crossval_dir", type=Path, help="a scheme=logo crossval out_dir")
    parser.add_argument("prepared", type=Path, help="the pool's prepared_dir")
    args = parser.parse_args()
    run = json.loads((args.crossval_dir / "crossval.json").read_text())
    classes = list(run["classes"])
    features, labels, sources, exports = recorded_features(args.prepared, classes)
    xr = classes.index(RADIOGRAPH_CLASS) if RADIOGRAPH_CLASS in classes else None
    unit_free = [i for i, c in enumerate(classes) if c in UNIT_FREE_CLASSES]
    fields = set(FusionCalibration.__dataclass_fields__)
    answers: dict[str, list[np.ndarray]] = {name: [] for name in [*DECISIONS, "CNN alone (calibrated)"]}
    truth = []
    for fold, stored in sorted(run["nested_calibrations"].items(), key=lambda kv: int(kv[0])):
        path = args.crossval_dir / f"fold_{int(fold):02d}" / "eval" / "predictions.csv"
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        held = [r for r in rows if r["key"] in features and r["exported"] == "0"]
        if not held:
            continue
        out_of_fold = {r["key"] for r in rows}
        train = [k for k in features if k not in out_of_fold]
        heads = fitted_heads(
            np.asarray([features[k] for k in train], dtype=np.float32),
            np.asarray([labels[k] for k in train]),
            [sources[k] for k in train],
            unit_free,
            np.asarray([v for k, v in exports.items() if k not in out_of_fold], dtype=np.float32),
            xr,
            len(classes),
        )
        calibration = FusionCalibration(**{k: v for k, v in stored.items() if k in fields})
        cnn = np.asarray([[float(r[f"cnn_prob_{c}"]) for c in classes] for r in held])
        x = np.asarray([features[r["key"]] for r in held], dtype=np.float32)
        as_float = x.copy()
        as_float[:, len(FLOAT_FEATURES) :] = 0.0  # no stored integers: both stored-peak statistics read 0
        with torch.inference_mode():
            values = {
                "stored": torch.softmax(heads[0](torch.from_numpy(x)), 1).numpy(),
                "main as float": torch.softmax(heads[0](torch.from_numpy(as_float)), 1).numpy(),
                "float head": torch.softmax(heads[1](torch.from_numpy(float_head_inputs(x))), 1).numpy(),
            }
        everyone = np.ones(len(held), dtype=bool)
        for name, (head, rule) in DECISIONS.items():
            product = everyone if rule == "product" else None
            answers[name].append(calibration.fuse(cnn, values[head], everyone, product).argmax(1))
        answers["CNN alone (calibrated)"].append(calibration.cnn(cnn).argmax(1))
        truth.append(np.asarray([classes.index(r["true"]) for r in held]))
    target = np.concatenate(truth)
    print(f"{len(target)} held-out DICOM/volume slices, {len(truth)} folds")
    print("| decision | " + " | ".join(classes) + " |")
    print("|---|" + "---|" * len(classes))
    for name, parts in answers.items():
        guess = np.concatenate(parts)
        recall = [
            f"{np.mean(guess[target == c] == c):.3f}" if np.any(target == c) else "-"
            for c in range(len(classes))
        ]
        print(f"| {name} | " + " | ".join(recall) + " |")


if __name__ == "__main__":
    main()
