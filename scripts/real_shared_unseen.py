"""Raw-file check of a real_shared checkpoint on every usable file of the sources it never trained on.

Why: the test shards hold a capped sample of the unseen sources (e.g. 80 of dcm_qa_nih's 208 MR files). This
runs the user-facing path instead (``python eval.py ckpt_path=... input=<folder>``: reader -> the checkpoint's
own preprocessing -> model) on ALL usable files of the val/test sources of ``configs/dataset/real_shared.yaml``,
and scores it against the corpus manifest's class column.

    python scripts/real_shared_unseen.py outputs/real_shared/checkpoints/best.ckpt [--splits val test] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from modality.paths import CONFIG_DIR, PROJECT_ROOT, shared_data_root

CLASSES = ("CT", "MR", "PT", "XR")


def dataset_name(source_repo: str) -> str:
    """The pool's dataset name for a manifest source repository (``owner/name`` -> ``owner+name``)."""
    return source_repo.replace("/", "+")


def unseen_rows(manifest: Path, split_of: dict[str, str], splits: set[str]) -> list[dict[str, str]]:
    """Manifest rows of usable CT/MR/PT/XR files whose source sits in one of ``splits``."""
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        row
        for row in rows
        if row["usable"] == "1"
        and row["class"] in CLASSES
        and split_of.get(dataset_name(row["source_repo"])) in splits
    ]


def link_tree(rows: list[dict[str, str]], root: Path, tree: Path) -> None:
    """Symlinks mirroring the corpus layout, so predictions.csv paths map back to manifest rows."""
    for row in rows:
        link = tree / row["path"]
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(root / row["path"], link)


def score(
    predictions: list[dict[str, str]], truth: dict[str, tuple[str, str]], column: str = "predicted"
) -> dict:
    """Per-slice accuracy, per-class recall and balanced accuracy (classes with support), per source, of the
    prediction in ``column`` (``predicted``: what eval.py answers; ``cnn_predicted``: the CNN alone)."""
    per_class: dict[str, Counter] = defaultdict(Counter)
    per_source: dict[str, Counter] = defaultdict(Counter)
    confusion: dict[str, Counter] = defaultdict(Counter)
    for row in predictions:
        cls, source = truth[row["path"]]
        ok = row[column] == cls
        per_class[cls]["n"] += 1
        per_class[cls]["ok"] += ok
        per_source[source]["n"] += 1
        per_source[source]["ok"] += ok
        confusion[cls][row[column]] += 1
    recall = {c: per_class[c]["ok"] / per_class[c]["n"] for c in CLASSES if per_class[c]["n"]}
    total = sum(v["n"] for v in per_class.values())
    return {
        "slices": total,
        "accuracy": sum(v["ok"] for v in per_class.values()) / total if total else None,
        "balanced_accuracy": sum(recall.values()) / len(recall) if recall else None,
        "recall": recall,
        "support": {c: per_class[c]["n"] for c in CLASSES},
        "per_source": {s: {"n": v["n"], "accuracy": v["ok"] / v["n"]} for s, v in sorted(per_source.items())},
        "confusion": {t: dict(p) for t, p in confusion.items()},
    }


def to_markdown(result: dict) -> str:
    lines = [
        f"Raw files of unseen sources: {result['files']} files, {result['slices']} slices, "
        f"{result['unreadable_files']} unreadable.",
        "",
        f"- accuracy {result['accuracy']:.3f}, balanced accuracy {result['balanced_accuracy']:.3f} "
        f"(over the classes present)"
        + (
            f"; the CNN alone {result['cnn_only']['balanced_accuracy']:.3f}"
            if result.get("cnn_only")
            and result["cnn_only"]["balanced_accuracy"] != result["balanced_accuracy"]
            else ""
        ),
        "- recall: "
        + ", ".join(f"{c} {r:.3f} (n={result['support'][c]})" for c, r in result["recall"].items()),
        "",
        "| source | slices | accuracy |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {v['n']} | {v['accuracy']:.3f} |" for s, v in result["per_source"].items()]
    lines += ["", "| true \\ predicted | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    for t in CLASSES:
        if t in result["confusion"]:
            lines.append(
                f"| {t} | " + " | ".join(str(result["confusion"][t].get(p, 0)) for p in CLASSES) + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--dataset", default="real_shared")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra eval.py overrides, e.g. fusion=cnn")
    args = parser.parse_args()
    out = args.out or args.ckpt.parent.parent / "unseen_raw"
    root = shared_data_root()
    split_of = dict(OmegaConf.load(CONFIG_DIR / "dataset" / f"{args.dataset}.yaml").split)
    rows = unseen_rows(root / "manifest.csv", split_of, set(args.splits))
    tree = out / "inputs"
    link_tree(rows, root, tree)
    cmd = [
        sys.executable,
        "eval.py",
        f"ckpt_path={args.ckpt.resolve()}",
        f"input={tree.resolve()}",
        f"out={(out / 'predict').resolve()}",
        *args.overrides,
    ]
    subprocess.run(cmd, cwd=PROJECT_ROOT, check=True)
    truth = {str((tree / r["path"]).resolve(strict=False)): (r["class"], r["source_repo"]) for r in rows}
    truth.update({str(tree.resolve() / r["path"]): (r["class"], r["source_repo"]) for r in rows})
    with open(out / "predict" / "predictions.csv", newline="") as handle:
        predictions = [p for p in csv.DictReader(handle) if p["path"] in truth]
    with open(out / "predict" / "unreadable.csv", newline="") as handle:
        unreadable = {u["path"] for u in csv.DictReader(handle) if u["frame"] == ""}
    result = score(predictions, truth)
    if predictions and "cnn_predicted" in predictions[0]:
        cnn = score(predictions, truth, "cnn_predicted")
        result["cnn_only"] = {k: cnn[k] for k in ("accuracy", "balanced_accuracy", "recall")}
    result.update({"files": len(rows), "unreadable_files": len(unreadable), "checkpoint": str(args.ckpt)})
    (out / "unseen_raw.json").write_text(json.dumps(result, indent=2))
    (out / "unseen_raw.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
