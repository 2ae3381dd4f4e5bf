"""Two cross-validation runs side by side: ``python -m modality.reports.compare base=<dir> candidate=<dir>``.

A recipe change is judged under leave-one-source-out by more than its pooled figure: on a pool where one source
holds 40% of the slices (the shared corpus's brain PET), a change that fixes that source and breaks five small
ones raises the pooled accuracy. So the comparison lists, per decision (CNN alone, value head alone, fused),
the over-folds, pooled and per-series figures, then every source that moved, and names the sources that
cross a floor (issue 14's "no source below 0.80") in either direction, plus the simulated-export figures per
class where both runs recorded them. It reads the ``crossval.json`` that ``python -m modality.crossval``
writes and decides nothing: an adoption rule is written down before the candidate runs (docs/results.md) and
checked against this table.

Either side may be several runs of the same folds (``base=[seed0,seed1]``): each figure is then the mean over
the runs, printed with every run's value beside it, because one seed's noise on a small source (a single
image) is as large as most recipe effects.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
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
    """One held-out source's balanced accuracy under one decision in both runs (None: absent from that run;
    the mean where a side averages several runs)."""

    decision: str
    source: str
    samples: int
    base: float | None
    candidate: float | None
    base_runs: tuple[float, ...] = ()  # each run's figure where a side averages several runs (seeds)
    candidate_runs: tuple[float, ...] = ()

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


def _mean_of(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return fmean(present) if present else None


def average_summaries(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One summary whose figures are the means over ``summaries``: runs of the same folds (seeds).

    Carries each figure's per-run values under ``"runs"`` beside it (the spread to print). Refuses runs over
    different classes or different held-out sources: a mean over other folds is not a second seed.
    """
    if not summaries:
        raise ValueError("no runs to average")
    first = summaries[0]
    if len(summaries) == 1:
        return dict(first)
    classes = list(first["classes"])
    for other in summaries[1:]:
        if list(other["classes"]) != classes:
            raise ValueError(f"the runs score different classes: {classes} vs {other['classes']}")
    names = [d for d in DECISIONS if all(d in s["decisions"] for s in summaries)]
    decisions: dict[str, Any] = {}
    for name in names:
        runs = [s["decisions"][name] for s in summaries]
        sources = set(runs[0]["per_source"])
        if any(set(r["per_source"]) != sources for r in runs[1:]):
            raise ValueError(
                f"decision {name!r}: the runs held out different sources (average seeds of the same folds)"
            )
        over = [r["balanced_acc"]["mean"] for r in runs]
        pooled = [r["pooled"]["balanced_acc"] for r in runs]
        series = [r.get("series", {}).get("pooled", {}).get("balanced_acc") for r in runs]
        decisions[name] = {
            "balanced_acc": {
                "mean": fmean(over),
                "std": fmean(r["balanced_acc"]["std"] for r in runs),
                "n": runs[0]["balanced_acc"].get("n"),
                "runs": over,
            },
            "pooled": {
                "balanced_acc": fmean(pooled),
                "recall": {c: _mean_of([r["pooled"]["recall"].get(c) for r in runs]) for c in classes},
                "runs": pooled,
            },
            "series": {"pooled": {"balanced_acc": _mean_of(series), "runs": series}},
            "per_source": {
                source: {
                    "samples": runs[0]["per_source"][source]["samples"],
                    "balanced_acc": fmean(r["per_source"][source]["balanced_acc"] for r in runs),
                    "runs": [r["per_source"][source]["balanced_acc"] for r in runs],
                }
                for source in sorted(sources)
            },
        }
    out: dict[str, Any] = {"classes": classes, "decisions": decisions, "runs": len(summaries)}
    exports = [s.get("exports") for s in summaries]
    if all(exports):
        export_classes = [c for c in classes if any(c in (e.get("support") or {}) for e in exports)]
        out["exports"] = {
            "acc_as_read": fmean(e["acc_as_read"] for e in exports),
            "acc_exported": fmean(e["acc_exported"] for e in exports),
            "runs": [e["acc_exported"] for e in exports],
        }
        if all(e.get("support") for e in exports):
            out["exports"] |= {
                "support": exports[0]["support"],
                "recall_as_read": {
                    c: _mean_of([e["recall_as_read"].get(c) for e in exports]) for c in export_classes
                },
                "recall_exported": {
                    c: _mean_of([e["recall_exported"].get(c) for e in exports]) for c in export_classes
                },
            }
    return out


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
                base_runs=tuple((a or {}).get("runs", ())),
                candidate_runs=tuple((b or {}).get("runs", ())),
            )
        )
    return sorted(rows, key=lambda r: (r.delta if r.delta is not None else 0.0, r.source))


def _headline(decided: Mapping[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    pooled = decided["pooled"]
    series = decided.get("series", {}).get("pooled", {})
    return {
        "over_folds": decided["balanced_acc"]["mean"],
        "over_folds_std": decided["balanced_acc"]["std"],
        "over_folds_runs": decided["balanced_acc"].get("runs", []),
        "pooled": pooled["balanced_acc"],
        "pooled_runs": pooled.get("runs", []),
        "recall": {c: pooled["recall"].get(c) for c in classes},
        "series": series.get("balanced_acc"),
        "series_runs": series.get("runs", []),
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


def _runs(values: Sequence[float | None]) -> str:
    """`` [a, b]``: each run's figure behind a mean over several runs; empty for one run."""
    if len(values) < 2:
        return ""
    return " [" + ", ".join(_f(v) for v in values) + "]"


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
                f"{h['over_folds']:.3f} ± {h['over_folds_std']:.3f}{_runs(h['over_folds_runs'])}",
                _f(h["pooled"]) + _runs(h["pooled_runs"]),
                *(_f(h["recall"][c]) for c in classes),
                _f(h["series"]) + _runs(h["series_runs"]),
                moved,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    ex = comparison.get("exports")
    if ex:
        a, b = ex["base"], ex["candidate"]
        lines += [
            "",
            f"- simulated 8-bit exports of the held-out DICOM/volume slices: {a['acc_exported']:.3f}"
            f"{_runs(a.get('runs', []))} -> {b['acc_exported']:.3f}{_runs(b.get('runs', []))} "
            f"(as read {a['acc_as_read']:.3f} -> {b['acc_as_read']:.3f})",
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
            lines.append(
                f"- {c.source} (n={c.samples}): {_f(c.base)}{_runs(c.base_runs)} -> "
                f"{_f(c.candidate)}{_runs(c.candidate_runs)}{delta}{note}"
            )
    return "\n".join(lines)


def _as_runs(runs: Path | Sequence[Path]) -> list[Path]:
    return [runs] if isinstance(runs, Path) else list(runs)


def write_comparison(
    base: Path | Sequence[Path],
    candidate: Path | Sequence[Path],
    floor: float = 0.80,
    out: Path | None = None,
) -> int:
    """Compare, print and write the Markdown (default ``compare.md`` in the first candidate run); the exit
    status (0 written, 2 a run has nothing to compare). A side given as several runs is their mean."""
    bases, candidates = _as_runs(base), _as_runs(candidate)
    if not bases or not candidates:
        print("say which runs to compare: base and candidate each name one run or more", file=sys.stderr)
        return 2
    try:
        comparison = compare_runs(
            average_summaries([load_summary(p) for p in bases]),
            average_summaries([load_summary(p) for p in candidates]),
            floor,
        )
    except (FileNotFoundError, ValueError) as error:
        print(error, file=sys.stderr)
        return 2
    text = format_comparison(comparison, " + ".join(map(str, bases)), " + ".join(map(str, candidates)))
    first = candidates[0]
    target = out if out is not None else (first if first.is_dir() else first.parent) / "compare.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text + "\n")
    print(text)
    print(f"\nwritten: {target}")
    return 0


def _paths(value: Any) -> list[Path]:
    """A config value naming one run (``base=dir``) or several (``base=[dir0,dir1]``)."""
    if isinstance(value, str):
        return [Path(value)]
    return [Path(str(v)) for v in value]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="compare")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "base") or OmegaConf.is_missing(cfg, "candidate"):
        print(
            "say which runs to compare: base=<crossval out_dir> candidate=<crossval out_dir>", file=sys.stderr
        )
        sys.exit(2)
    out = None if cfg.out is None else Path(cfg.out)
    sys.exit(write_comparison(_paths(cfg.base), _paths(cfg.candidate), float(cfg.floor), out))


if __name__ == "__main__":
    main()
