"""Regenerate the tables and figures of docs/results.md from the real_shared runs on disk.

    python scripts/real_shared_results.py [--runs outputs/real_shared outputs/real_shared_e20 ...]

Figures and the runs table come from ``python -m modality.reports`` (written to docs/results/); this script adds
what the report does not show for this experiment: the scaling of each run's shards, per-class recall on the
validation and test sources, the raw-file check on unseen sources and the cross-validation summary. Only the
block between the ``generated`` markers of docs/results.md is replaced, so the discussion around it stays.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# the sibling script: run as `python scripts/real_shared_results.py`, Python puts scripts/ first on the path
from real_shared_two_way import recipe_summary

from modality.paths import PROJECT_ROOT
from modality.reports.cli import write_report

START = "<!-- generated:start (scripts/real_shared_results.py) -->"
END = "<!-- generated:end -->"
CLASSES = ("CT", "MR", "PT", "XR")
DEFAULT_RUNS = (
    # the committed recipe (20 epochs, gamma/blur/noise augmentation), four seeds
    "outputs/real_shared",
    "outputs/real_shared_seed1",
    "outputs/real_shared_seed2",
    "outputs/real_shared_seed3",
    # the same without gamma/blur/noise, three seeds
    "outputs/real_shared_noint_s0",
    "outputs/real_shared_noint_s1",
    "outputs/real_shared_noint_s2",
    # earlier rounds: 40 epochs, and shards prepared before the pixel-padding reader change
    "outputs/real_shared_e40",
    "outputs/real_shared_e40_seed1",
    "outputs/real_shared_oldreader",
    # ablations (20 epochs, before gamma/blur/noise)
    "outputs/real_shared_e20",
    "outputs/real_shared_e20_seed1",
    "outputs/real_shared_e20_seed2",
    "outputs/real_shared_dtype",
    "outputs/real_shared_minmax",
    "outputs/real_shared_window",
    "outputs/real_shared_mnasnet",
    "outputs/real_shared_noaug",
    "outputs/real_shared_128",
)


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_row(run_dir: Path) -> str | None:
    """One Markdown row: run, network, scaling, epochs, val and test balanced accuracy and per-class recall."""
    summary = _read(run_dir / "run_summary.json")
    if summary is None:
        return None
    data = _read(Path(summary["data_dir"]) / "summary.json") or {}
    scaling = (data.get("preprocess") or {}).get("scaling", {}).get("method", "?")
    val = summary.get("val") or {}
    val_evaluation = _read(run_dir / "eval_val" / "metrics.json")
    if val_evaluation is not None:  # eval.py split=val: fused with the value head when the model has one
        val = {"balanced_acc": val_evaluation["balanced_accuracy"]}
        val.update(
            {f"recall_{c}": v["recall"] for c, v in val_evaluation["per_class"].items() if v["support"]}
        )
    evaluation = _read(run_dir / "eval" / "metrics.json")
    if evaluation is not None:
        test_bal = evaluation["balanced_accuracy"]
        test_recall = {c: v["recall"] for c, v in evaluation["per_class"].items() if v["support"]}
    else:
        test = summary.get("test") or {}
        test_bal = test.get("balanced_acc")
        test_recall = {c: test[f"recall_{c}"] for c in CLASSES if f"recall_{c}" in test}
    fused = evaluation is not None and "fusion" in evaluation
    cells = [
        run_dir.name + (" (CNN + value head)" if fused else ""),
        str(summary.get("model")),
        scaling,
        str(summary.get("epochs")),
        _fmt(val.get("balanced_acc")),
        " / ".join(_fmt(val.get(f"recall_{c}")) for c in ("CT", "MR", "XR")),
        _fmt(test_bal),
        " / ".join(_fmt(test_recall.get(c)) for c in ("CT", "MR", "XR")),
        f"{summary.get('train_time_s') or 0:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def two_way_block(path: Path) -> list[str]:
    """The recipe comparison of scripts/real_shared_two_way.py: both halves of the held-out sources."""
    results = _read(path)
    if not results:
        return []
    lines = [
        "",
        "### Recipes with more training sources, scored on both held-out halves (scripts/real_shared_two_way.py)",
        "",
        "Each recipe trains twice per seed: on train + test sources scored on the val sources, and on train + val",
        "sources scored on the test sources; last checkpoint, no selection on held-out data.",
        "",
        "| recipe | overrides | runs | bal. acc (mean) | val half | test half | recall CT / MR / XR (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        summary = recipe_summary(result["runs"])
        halves = summary["halves"]
        overrides = " ".join(f"`{o}`" for o in result["overrides"]) or "(the committed recipe)"
        cells = [
            name,
            overrides,
            str(len(result["runs"])),
            _fmt(summary["mean"]),
            " / ".join(_fmt(v) for v in halves["val"]),
            " / ".join(_fmt(v) for v in halves["test"]),
            " / ".join(f"{summary['recall'][c]:.2f}" for c in ("CT", "MR", "XR")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    raw = {name: result["raw"] for name, result in results.items() if result.get("raw")}
    if raw:
        lines += [
            "",
            "The same runs scored the way users run them, on every raw file of the held-out half",
            "(`--raw`: `eval.py input=...`; the value head fused in where the recipe has one):",
            "",
            "| recipe | runs | bal. acc (mean) | CNN alone (mean) | per run |",
            "|---|---|---|---|---|",
        ]
        for name, runs in raw.items():
            fused = [r["balanced_acc"] for r in runs.values()]
            cnn = [r["cnn_balanced_acc"] for r in runs.values()]
            per_run = ", ".join(f"{k} {v['balanced_acc']:.3f}" for k, v in runs.items())
            lines.append(
                f"| {name} | {len(runs)} | {sum(fused) / len(fused):.3f} | {sum(cnn) / len(cnn):.3f} | {per_run} |"
            )
    return lines


def generated_block(runs: list[Path]) -> str:
    lines = [
        START,
        "",
        "### Runs (validation and test sources are unseen in training)",
        "",
        "| run | network | scaling | epochs | val bal. acc | val recall CT / MR / XR | test bal. acc "
        "| test recall CT / MR / XR | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row for row in (run_row(r) for r in runs) if row]
    lines += [
        "",
        "Val: dcm4che, dcmqi, RSNA, dcm_qa(+ts, heudiconv), MedRAX; test: dcm_qa_nih, ami, DICOMSamples,",
        "dicom2nifti, Actualmed, MedNIST, knee (no PET in either). Val/test numbers from `eval.py` where it was run",
        "on the run (`eval_val/`, `eval/`; CNN + value head where the run has one), else from train.py's own pass",
        "(the CNN). `train s` is wall time on the shared 2-core machine at",
        "whatever load it had then (1 torch thread): compare it only within a row group run side by side.",
    ]
    lines += two_way_block(PROJECT_ROOT / "outputs" / "two_way" / "two_way.json")
    refit = _read(PROJECT_ROOT / "outputs" / "real_shared" / "refit" / "run_summary.json")
    if refit is not None:
        lines += [
            "",
            f"Final model (refit on every split, last of {refit.get('epochs')} epochs, "
            f"{refit.get('train_time_s') or 0:.0f} s): `outputs/real_shared/refit/checkpoints/last.ckpt`. "
            "It has no unseen figures of its own; the two-way tables above measure training on more sources.",
        ]
    unseen = PROJECT_ROOT / "outputs" / "real_shared" / "unseen_raw" / "unseen_raw.md"
    if unseen.is_file():
        lines += ["", "### Raw files of the unseen sources (eval.py input=..., best checkpoint)", ""]
        lines += [unseen.read_text().strip()]
    crossval_md = PROJECT_ROOT / "outputs" / "crossval" / "real_shared" / "crossval.md"
    if crossval_md.is_file():
        lines += ["", "### Grouped cross-validation over source groups", "", crossval_md.read_text().strip()]
    lines += ["", "### Figures (python -m modality.reports)", ""]
    for png in sorted((PROJECT_ROOT / "docs" / "results").glob("*.png")):
        lines.append(f"![{png.stem}](results/{png.name})")
    lines += ["", END]
    return "\n".join(lines)


def shrink_png(path: Path, limit: int = 200_000) -> None:
    """Palette-quantise a figure over ``limit`` bytes: docs/ keeps figures small (repo rule: < 200 KB)."""
    if path.stat().st_size <= limit:
        return
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS))
    parser.add_argument("--doc", type=Path, default=PROJECT_ROOT / "docs" / "results.md")
    args = parser.parse_args()
    runs = [PROJECT_ROOT / r for r in args.runs if (PROJECT_ROOT / r / "run_summary.json").is_file()]
    out = PROJECT_ROOT / "docs" / "results"
    if write_report(runs, out) != 0:
        raise SystemExit(f"no run_summary.json under {', '.join(map(str, runs))}")
    # the HTML inlines every figure again; every run here has the same L2, so that figure says nothing
    for unused in ("report.html", "runs.csv", "accuracy_against_l2.png"):
        (out / unused).unlink(missing_ok=True)
    for png in out.glob("*.png"):
        shrink_png(png)
    text = args.doc.read_text() if args.doc.is_file() else f"# Results\n\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    args.doc.write_text(head + generated_block(runs) + tail)
    print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
