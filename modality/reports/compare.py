"""Two cross-validation runs side by side: ``python -m modality.reports.compare base=<dir> candidate=<dir>``.

A recipe change is judged under leave-one-source-out by more than its pooled figure: on a pool where one source
holds 40% of the slices (the shared corpus's brain PET), a change that fixes that source and breaks five small
ones raises the pooled accuracy. So the comparison lists, per decision (CNN alone, value head alone, fused),
the over-folds, pooled and per-series figures, then every source that moved, and names the sources that
cross a floor (issue 14's "no source below 0.80") in either direction, plus the simulated-export figures per
class where both runs recorded them. It reads the ``crossval.json`` that ``python -m modality.crossval``
writes and decides nothing: an adoption rule is written down before the candidate runs (docs/results.md) and
checked against this table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from modality.paths import CONFIG_DIR

#: The decisions ``crossval.json`` records with nested calibration, in the order they are printed.
DECISIONS = ("cnn", "values", "fused")
#: Changes in a source's balanced accuracy below this are listed as unchanged (rounding of a printed figure).
MIN_DELTA = 0.005


@dataclass(frozen=True)
class SourceChange:
    """One held-out source's balanced accuracy under one decision in both runs (None: absent from that run)."""

    decision: str
    source: str
    samples: int
    base: float | None
    candidate: float | None

    @property
    def delta(self) -> float | None:
        if self.base is None or self.candidate is None:
            return None
        return self.candidate - self.base

    def crossing(self, floor: float) -> str | None:
        """``"falls below"`` / ``"rises above"`` where the source crosses ``floor``, else None."""
        if self.base is None or self.candidate is None:
            return None
        if self.base >= floor > self.candidate:
            return "falls below"
        if self.candidate >= floor > self.base:
            return "rises above"
        return None


def load_summary(run_dir: Path) -> dict[str, Any]:
    """``crossval.json`` of a cross-validation output folder (or the file itself), with a clear error where
    the run has none or was summarised without head probabilities (no per-decision figures to compare)."""
    path = run_dir / "crossval.json" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no crossval.json (is this a `python -m modality.crossval` out_dir?)"
        )
    summary = json.loads(path.read_text())
    if not summary.get("decisions"):
        raise ValueError(f"{path}: no per-decision figures (the folds recorded no head probabilities)")
    for name, decided in summary["decisions"].items():
        missing = [key for key in ("balanced_acc", "pooled", "per_source") if key not in decided]
        if missing:
            raise ValueError(
                f"{path}: decision {name!r} lacks {missing} (summarise the run again without folds=)"
            )
    return summary


def source_changes(
    base: Mapping[str, Any], candidate: Mapping[str, Any], decision: str
) -> list[SourceChange]:
    """Every source of either run under ``decision``, largest fall first."""
    before = base["decisions"][decision]["per_source"]
    after = candidate["decisions"][decision]["per_source"]
    rows = []
    for source in sorted(set(before) | set(after)):
        a, b = before.get(source), after.get(source)
        rows.append(
            SourceChange(
                decision=decision,
                source=source,
                samples=int((b or a)["samples"]),
                base=None if a is None else float(a["balanced_acc"]),
                candidate=None if b is None else float(b["balanced_acc"]),
            )
        )
    return sorted(rows, key=lambda r: (r.delta if r.delta is not None else 0.0, r.source))


def _headline(decided: Mapping[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    pooled = decided["pooled"]
    series = decided.get("series", {}).get("pooled", {})
    return {
        "over_folds": decided["balanced_acc"]["mean"],
        "over_folds_std": decided["balanced_acc"]["std"],
        "pooled": pooled["balanced_acc"],
        "recall": {c: pooled["recall"].get(c) for c in classes},
        "series": series.get("balanced_acc"),
    }


def compare_runs(
    base: Mapping[str, Any], candidate: Mapping[str, Any], floor: float = 0.80
) -> dict[str, Any]:
    """The figures of both runs per decision, the sources that moved, those crossing ``floor``, exports."""
    if list(base["classes"]) != list(candidate["classes"]):
        raise ValueError(f"the runs score different classes: {base['classes']} vs {candidate['classes']}")
    classes = list(base["classes"])
    decisions = [d for d in DECISIONS if d in base["decisions"] and d in candidate["decisions"]]
    out: dict[str, Any] = {"classes": classes, "floor": floor, "decisions": {}}
    for name in decisions:
        changes = source_changes(base, candidate, name)
        moved = [c for c in changes if c.delta is None or abs(c.delta) >= MIN_DELTA]
        out["decisions"][name] = {
            "base": _headline(base["decisions"][name], classes),
            "candidate": _headline(candidate["decisions"][name], classes),
            "moved": moved,
            "up": sum(c.delta is not None and c.delta >= MIN_DELTA for c in changes),
            "down": sum(c.delta is not None and c.delta <= -MIN_DELTA for c in changes),
            "sources": len(changes),
            "crossing": [c for c in changes if c.crossing(floor)],
        }
    ex_a, ex_b = base.get("exports"), candidate.get("exports")
    if ex_a and ex_b:
        out["exports"] = {"base": ex_a, "candidate": ex_b}
    return out


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_comparison(comparison: Mapping[str, Any], base_name: str, candidate_name: str) -> str:
    """Markdown: one table of headline figures, then per decision the sources that moved."""
    classes = comparison["classes"]
    lines = [
        f"Base: `{base_name}`; candidate: `{candidate_name}` (leave-one-source-out, nested calibration).",
        "",
        "| decision | run | over folds | pooled balanced | "
        + " | ".join(classes)
        + " | per series, pooled | sources up / down |",
        "|" + "---|" * (6 + len(classes)),
    ]
    for name, d in comparison["decisions"].items():
        for run in ("base", "candidate"):
            h = d[run]
            moved = f"{d['up']} / {d['down']} of {d['sources']}" if run == "candidate" else ""
            cells = [
                name if run == "base" else "",
                run,
                f"{h['over_folds']:.3f} ± {h['over_folds_std']:.3f}",
                _f(h["pooled"]),
                *(_f(h["recall"][c]) for c in classes),
                _f(h["series"]),
                moved,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    ex = comparison.get("exports")
    if ex:
        a, b = ex["base"], ex["candidate"]
        lines += [
            "",
            f"- simulated 8-bit exports of the held-out DICOM/volume slices: {a['acc_exported']:.3f} -> "
            f"{b['acc_exported']:.3f} (as read {a['acc_as_read']:.3f} -> {b['acc_as_read']:.3f})",
        ]
        if a.get("support") and b.get("support"):
            lines.append(
                "- exports per class: "
                + ", ".join(
                    f"{c} {_f(a['recall_exported'].get(c))} -> {_f(b['recall_exported'].get(c))}"
                    for c in classes
                    if c in a["support"] or c in b["support"]
                )
            )
    floor = comparison["floor"]
    for name, d in comparison["decisions"].items():
        lines += [
            "",
            f"**{name}**: sources that moved by {MIN_DELTA} or more (balanced accuracy, n held out)",
            "",
        ]
        if not d["moved"]:
            lines.append("- none")
        for c in d["moved"]:
            cross = c.crossing(floor)
            note = f" **{cross} {floor:.2f}**" if cross else ""
            delta = "" if c.delta is None else f" ({c.delta:+.3f})"
            lines.append(f"- {c.source} (n={c.samples}): {_f(c.base)} -> {_f(c.candidate)}{delta}{note}")
    return "\n".join(lines)


def write_comparison(base: Path, candidate: Path, floor: float = 0.80, out: Path | None = None) -> int:
    """Compare, print and write the Markdown (default ``<candidate>/compare.md``); the exit status (0 written,
    2 a run has nothing to compare)."""
    try:
        comparison = compare_runs(load_summary(base), load_summary(candidate), floor)
    except (FileNotFoundError, ValueError) as error:
        print(error, file=sys.stderr)
        return 2
    text = format_comparison(comparison, str(base), str(candidate))
    target = (
        out if out is not None else (candidate if candidate.is_dir() else candidate.parent) / "compare.md"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text + "\n")
    print(text)
    print(f"\nwritten: {target}")
    return 0


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="compare")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "base") or OmegaConf.is_missing(cfg, "candidate"):
        print(
            "say which runs to compare: base=<crossval out_dir> candidate=<crossval out_dir>", file=sys.stderr
        )
        sys.exit(2)
    out = None if cfg.out is None else Path(cfg.out)
    sys.exit(write_comparison(Path(cfg.base), Path(cfg.candidate), float(cfg.floor), out))


if __name__ == "__main__":
    main()
