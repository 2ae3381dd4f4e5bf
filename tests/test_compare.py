"""Two cross-validation summaries side by side (modality/reports/compare.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modality.reports.compare import (
    average_summaries,
    compare_runs,
    format_comparison,
    load_summary,
    write_comparison,
)

CLASSES = ["CT", "MR", "PT", "XR"]


def _decided(per_source: dict[str, float], pooled: float) -> dict:
    recall = dict.fromkeys(CLASSES, pooled)
    return {
        "balanced_acc": {
            "mean": sum(per_source.values()) / len(per_source),
            "std": 0.1,
            "n": len(per_source),
        },
        "pooled": {"balanced_acc": pooled, "recall": recall},
        "per_source": {s: {"samples": 10, "balanced_acc": v} for s, v in per_source.items()},
        "series": {"pooled": {"balanced_acc": pooled - 0.01}},
    }


def _summary(cnn: dict[str, float], fused: dict[str, float], exported: float) -> dict:
    return {
        "classes": CLASSES,
        "decisions": {"cnn": _decided(cnn, 0.6), "fused": _decided(fused, 0.95)},
        "exports": {
            "acc_as_read": 0.99,
            "acc_exported": exported,
            "samples": 20,
            "support": {"CT": 10, "PT": 10},
            "recall_as_read": {"CT": 1.0, "PT": 0.98},
            "recall_exported": {"CT": exported, "PT": exported},
        },
    }


BASE = _summary({"a": 0.5, "b": 0.9, "c": 0.7}, {"a": 0.95, "b": 0.85, "c": 0.79}, 0.4)
CANDIDATE = _summary({"a": 0.5, "b": 0.6, "c": 0.9}, {"a": 0.952, "b": 0.75, "c": 0.81}, 0.7)


def test_sources_crossing_the_floor_are_named_both_ways_and_unchanged_ones_left_out() -> None:
    comparison = compare_runs(BASE, CANDIDATE, floor=0.80)
    fused = comparison["decisions"]["fused"]
    assert [c.source for c in fused["moved"]] == ["b", "c"]  # a moved by 0.002: unchanged
    assert {c.source: c.crossing(0.80) for c in fused["crossing"]} == {"b": "falls below", "c": "rises above"}
    assert (fused["up"], fused["down"], fused["sources"]) == (1, 1, 3)
    cnn = comparison["decisions"]["cnn"]
    assert {c.source: c.crossing(0.80) for c in cnn["crossing"]} == {"b": "falls below", "c": "rises above"}
    assert [round(c.delta, 3) for c in cnn["moved"]] == [-0.3, 0.2]
    text = format_comparison(comparison, "base", "candidate")
    assert "b (n=10): 0.850 -> 0.750 (-0.100) **falls below 0.80**" in text
    assert "exports per class: CT 0.400 -> 0.700" in text
    assert "values" not in comparison["decisions"]  # a decision only one run has is not compared


def test_a_source_only_one_run_holds_is_listed_without_a_delta() -> None:
    candidate = json.loads(json.dumps(CANDIDATE))
    candidate["decisions"]["fused"]["per_source"]["d"] = {"samples": 3, "balanced_acc": 0.0}
    moved = compare_runs(BASE, candidate)["decisions"]["fused"]["moved"]
    new = next(c for c in moved if c.source == "d")
    assert new.base is None and new.delta is None and new.crossing(0.8) is None


def test_runs_over_different_classes_are_refused() -> None:
    other = {**CANDIDATE, "classes": ["CT", "MR"]}
    with pytest.raises(ValueError, match="different classes"):
        compare_runs(BASE, other)


def test_write_comparison_writes_markdown_and_refuses_a_folder_without_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for name, summary in (("base", BASE), ("cand", CANDIDATE)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "crossval.json").write_text(json.dumps(summary))
    assert write_comparison(tmp_path / "base", tmp_path / "cand") == 0
    assert "falls below 0.80" in (tmp_path / "cand" / "compare.md").read_text()
    (tmp_path / "empty").mkdir()
    assert write_comparison(tmp_path / "empty", tmp_path / "cand") == 2
    assert "no crossval.json" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "crossval.json").write_text(json.dumps({"classes": CLASSES}))
    with pytest.raises(ValueError, match="no per-decision figures"):
        load_summary(tmp_path / "plain")
    (tmp_path / "plain" / "crossval.json").write_text(
        json.dumps({"classes": CLASSES, "decisions": {"cnn": {}}})
    )
    with pytest.raises(ValueError, match="lacks"):
        load_summary(tmp_path / "plain")
    (tmp_path / "plain" / "crossval.json").write_text("{not json")
    assert write_comparison(tmp_path / "plain", tmp_path / "cand") == 2


def test_seeds_of_each_side_are_averaged_and_each_run_is_printed_beside_the_mean(tmp_path: Path) -> None:
    seed1 = _summary({"a": 0.5, "b": 0.7, "c": 0.7}, {"a": 0.95, "b": 0.75, "c": 0.79}, 0.6)
    mean = average_summaries([BASE, seed1])
    fused = mean["decisions"]["fused"]
    assert fused["per_source"]["b"]["balanced_acc"] == pytest.approx(0.80)
    assert fused["per_source"]["b"]["runs"] == [0.85, 0.75]
    assert fused["balanced_acc"]["mean"] == pytest.approx((0.8633333 + 0.83) / 2)
    assert mean["exports"]["acc_exported"] == pytest.approx(0.5)
    assert mean["exports"]["recall_exported"] == {"CT": pytest.approx(0.5), "PT": pytest.approx(0.5)}
    # b: 0.80 mean (0.85, 0.75) at base; the candidate's 0.75 is below the floor: a crossing of the means
    comparison = compare_runs(mean, CANDIDATE)
    assert {c.source for c in comparison["decisions"]["fused"]["crossing"]} == {"b", "c"}
    text = format_comparison(comparison, "seeds", "candidate")
    assert "b (n=10): 0.800 [0.850, 0.750] -> 0.750 (-0.050) **falls below 0.80**" in text
    assert "0.400 [0.400, 0.600] -> 0.700" not in text  # exports: the mean, then the runs
    assert "0.500 [0.400, 0.600] -> 0.700" in text
    for name, summary in (("s0", BASE), ("s1", seed1), ("cand", CANDIDATE)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "crossval.json").write_text(json.dumps(summary))
    assert write_comparison([tmp_path / "s0", tmp_path / "s1"], [tmp_path / "cand"]) == 0
    assert "[0.850, 0.750]" in (tmp_path / "cand" / "compare.md").read_text()


def test_runs_over_different_folds_are_not_averaged(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other_folds = _summary({"a": 0.5, "z": 0.7}, {"a": 0.95, "z": 0.75}, 0.6)
    with pytest.raises(ValueError, match="different sources"):
        average_summaries([BASE, other_folds])
    for name, summary in (("s0", BASE), ("other", other_folds)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "crossval.json").write_text(json.dumps(summary))
    assert write_comparison([tmp_path / "s0", tmp_path / "other"], tmp_path / "s0") == 2
    assert "different sources" in capsys.readouterr().err
    assert write_comparison([], tmp_path / "s0") == 2


def test_compare_config_composes() -> None:
    from hydra import compose, initialize_config_dir

    from modality.paths import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("compare", overrides=["base=a", "candidate=b"])
    assert (cfg.base, cfg.candidate, cfg.floor, cfg.out) == ("a", "b", 0.8, None)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("compare", overrides=["base=[a,b]", "candidate=c"])
    from modality.reports.compare import _paths

    assert (_paths(cfg.base), _paths(cfg.candidate)) == ([Path("a"), Path("b")], [Path("c")])
