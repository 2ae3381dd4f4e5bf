"""Compare training recipes on unseen sources with both halves of the held-out sources, PET kept trainable.

Why: the source split of ``configs/dataset/real_shared.yaml`` puts the linked group holding every PET file in
train and 15 other sources in val and test. One run scores a recipe on val's 7 sources only, a noisy handful of
series. This trains each recipe twice per seed, last checkpoint, no selection on held-out data:

* ``val``: trained on train + test sources, scored on the val sources (unseen);
* ``test``: trained on train + val sources, scored on the test sources (unseen).

Both runs see more sources than the measured run does, as the final refit does. The script prints one row per
recipe (mean over seeds and both halves) and writes ``two_way.json`` under ``--out``. The scores are train.py's
own test pass over the held-out shards (the CNN). With ``--raw``, each run's last checkpoint is also scored the
way users run it, ``eval.py input=<every raw file of the held-out half>`` (scripts/real_shared_unseen.py: the
value head fused in when the recipe has one), into ``raw`` entries of ``two_way.json``.

    python scripts/real_shared_two_way.py --seeds 0 1 --recipe base= --recipe "r128=data.image_size=128;trainer.max_epochs=20"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

from modality.paths import PROJECT_ROOT

HALVES = {
    # half: (the splits it trains on, the unseen split it is scored on)
    "val": ("[train,test]", "val"),
    "test": ("[train,val]", "test"),
}
COMMON = [
    "experiment=real_shared",
    "refit.train_splits=null",
    "callbacks.best_checkpoint=null",  # no checkpoint selection: the scored split is unseen
    "validate_best=false",
    "callbacks.epoch_checkpoint.every_n_epochs=1000",  # only last.ckpt, for raw-file checks afterwards
]


def recipe_summary(runs: dict[str, dict]) -> dict:
    """Per-half balanced accuracies, their overall mean and mean recall per class of one recipe's runs
    (``{"<half>_s<seed>": scored metrics}``); a class a run did not score counts as NaN, not as 0."""
    halves = {h: [m["balanced_acc"] for k, m in sorted(runs.items()) if k.startswith(h)] for h in HALVES}
    every = [v for values in halves.values() for v in values]
    recall = {c: mean(m.get(f"recall_{c}", float("nan")) for m in runs.values()) for c in ("CT", "MR", "XR")}
    return {"halves": halves, "mean": mean(every), "recall": recall}


def train_half(name: str, overrides: list[str], half: str, seed: int, out: Path) -> None:
    """Train one half for one seed into ``out/name/<half>_s<seed>`` (a finished run is kept, not redone)."""
    splits, scored = HALVES[half]
    run_dir = out / name / f"{half}_s{seed}"
    summary_path = run_dir / "run_summary.json"
    if not summary_path.is_file():
        command = [
            sys.executable,
            "train.py",
            *COMMON,
            f"data.train_splits={splits}",
            f"test={'true' if scored == 'test' else 'false'}",
            f"seed={seed}",
            f"task_name=two_way_{name}",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"{half}_s{seed}.log", "w") as log:
            subprocess.run(
                command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True
            )


def raw_score(run_dir: Path, half: str) -> dict:
    """Balanced accuracy of the run's last checkpoint on every raw file of the held-out half (cached)."""
    out = run_dir / "unseen_raw"
    if not (out / "unseen_raw.json").is_file():
        command = [
            sys.executable,
            "scripts/real_shared_unseen.py",
            str(run_dir / "checkpoints" / "last.ckpt"),
            "--splits",
            HALVES[half][1],
            "--out",
            str(out),
        ]
        subprocess.run(command, cwd=PROJECT_ROOT, check=True, capture_output=True)
    result = json.loads((out / "unseen_raw.json").read_text())
    cnn = result.get("cnn_only") or result
    return {"balanced_acc": result["balanced_accuracy"], "cnn_balanced_acc": cnn["balanced_accuracy"]}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipe", action="append", required=True, help="name=override;override;... (semicolons)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "outputs" / "two_way")
    parser.add_argument("--raw", action="store_true", help="also score raw files with eval.py input=...")
    args = parser.parse_args()
    results = {}
    for spec in args.recipe:
        name, _, rest = spec.partition("=")
        overrides = [item for item in rest.split(";") if item]
        for seed in args.seeds:
            for half in HALVES:
                train_half(name, overrides, half, seed, args.out)
        scores = {}  # every finished run of this recipe on disk (other invocations may have added seeds)
        for summary in sorted((args.out / name).glob("*_s*/run_summary.json")):
            half = summary.parent.name.split("_s")[0]
            scores[summary.parent.name] = json.loads(summary.read_text())[HALVES[half][1]]
        results[name] = {"overrides": overrides, "runs": scores}
        if args.raw:
            results[name]["raw"] = {
                run: raw_score(args.out / name / run, run.split("_s")[0]) for run in sorted(scores)
            }
    args.out.mkdir(parents=True, exist_ok=True)
    previous = (
        json.loads((args.out / "two_way.json").read_text()) if (args.out / "two_way.json").is_file() else {}
    )
    (args.out / "two_way.json").write_text(json.dumps(previous | results, indent=2))
    print(
        f"{'recipe':<14} {'bal. acc (mean)':>15} {'val half':>9} {'test half':>9}  recall CT / MR / XR (mean)"
    )
    for name, result in (previous | results).items():
        summary = recipe_summary(result["runs"])
        halves, recall = summary["halves"], summary["recall"]
        print(
            f"{name:<14} {summary['mean']:>15.3f} {mean(halves['val']):>9.3f} {mean(halves['test']):>9.3f}  "
            + " / ".join(f"{recall[c]:.2f}" for c in ("CT", "MR", "XR"))
        )
        if result.get("raw"):
            raw = result["raw"]
            print(
                f"{'':<14} raw files, eval.py: {mean(r['balanced_acc'] for r in raw.values()):.3f} "
                f"(CNN alone {mean(r['cnn_balanced_acc'] for r in raw.values()):.3f}; "
                + ", ".join(f"{k} {v['balanced_acc']:.3f}" for k, v in raw.items())
                + ")"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
