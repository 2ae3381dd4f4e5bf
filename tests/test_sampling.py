"""Caps are filled evenly across patients and series, deterministically, not with the first N files."""

from __future__ import annotations

import itertools
from collections import Counter

from modality.records import InputItem, SliceHeader
from modality.shards.sampling import allocate_round_robin, apply_caps, cap_evenly, spread_evenly


def series_headers(patient: str, series: str, n: int, dataset: str = "site") -> list[SliceHeader]:
    """One multi-frame file per series (frame index = slice)."""
    item = InputItem(path=f"/data/{patient}/{series}.dcm", dataset=dataset, kind="dicom")
    return [SliceHeader(item, i, n, "CT", "CHEST", patient, f"study-{patient}", series) for i in range(n)]


def test_spread_evenly_is_centred_and_covers_both_ends() -> None:
    assert spread_evenly(10, 2) == [2, 7]
    assert spread_evenly(100, 4) == [12, 37, 62, 87]
    assert spread_evenly(5, 5) == [0, 1, 2, 3, 4]
    assert spread_evenly(5, 9) == [0, 1, 2, 3, 4]
    assert spread_evenly(5, 0) == []


def test_round_robin_is_max_min_fair() -> None:
    # Patient 0 has one long series, patient 1 two short ones, patient 2 almost nothing.
    quotas = allocate_round_robin([[1000], [3, 50], [2]], cap=30)
    per_patient = [sum(q) for q in quotas]
    assert sum(per_patient) == 30
    assert per_patient[2] == 2  # ran out; its unused share goes to the others
    assert per_patient == [14, 14, 2]
    assert quotas[1] == [3, 11]  # series take turns until the short one runs out


def test_cap_spreads_over_patients_not_first_files() -> None:
    headers = []
    # Patient "a" sorts first and has by far the most slices: the reference study's first-N would take only "a".
    headers += series_headers("a", "s1", 500)
    headers += series_headers("b", "s1", 40)
    headers += series_headers("b", "s2", 40)
    headers += series_headers("c", "s1", 60)
    result = cap_evenly(headers, 90, "0:site:CT")
    assert len(result.chosen) == 90
    assert len(result.over_cap) == len(headers) - 90
    per_patient = Counter(h.patient_id for h in result.chosen)
    assert per_patient == {"a": 30, "b": 30, "c": 30}
    per_series_b = Counter(h.series_uid for h in result.chosen if h.patient_id == "b")
    assert per_series_b == {"s1": 15, "s2": 15}
    # Slices are spread along the long series, not its first 30.
    chosen_a = sorted(h.index for h in result.chosen if h.patient_id == "a")
    assert chosen_a[0] < 20 and chosen_a[-1] > 480
    gaps = {b - a for a, b in itertools.pairwise(chosen_a)}
    assert gaps <= {16, 17}


def test_cap_is_deterministic_and_order_independent() -> None:
    headers = [h for p in "abcdefg" for h in series_headers(p, "s", 7)]
    first = cap_evenly(headers, 10, "3:site:CT").chosen
    again = cap_evenly(list(reversed(headers)), 10, "3:site:CT").chosen
    assert [(h.patient_id, h.index) for h in first] == [(h.patient_id, h.index) for h in again]
    # 7 patients, cap 10: every patient gets one slice, three patients (chosen by the seed) a second.
    assert sorted(Counter(h.patient_id for h in first).values()) == [1, 1, 1, 1, 2, 2, 2]


def test_seed_changes_which_patients_get_the_remainder() -> None:
    headers = [h for p in "abcdefghij" for h in series_headers(p, "s", 3)]
    picks = {
        frozenset(
            p
            for p, n in Counter(h.patient_id for h in cap_evenly(headers, 15, f"{s}:x:CT").chosen).items()
            if n == 2
        )
        for s in range(6)
    }
    assert len(picks) > 1


def test_apply_caps_per_dataset_per_class_and_uncapped_classes() -> None:
    pairs = [(h, "CT") for h in series_headers("a", "s", 30, "site1")]
    pairs += [(h, "CT") for h in series_headers("b", "s", 30, "site2")]
    pairs += [(h, "PT") for h in series_headers("c", "s", 30, "site1")]
    result = apply_caps(pairs, {"CT": 10}, seed=0)
    kept = Counter((h.item.dataset, h.patient_id) for h in result.chosen)
    assert kept == {("site1", "a"): 10, ("site2", "b"): 10, ("site1", "c"): 30}
    assert len(result.over_cap) == 40
