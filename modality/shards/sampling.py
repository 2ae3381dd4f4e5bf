"""Per-dataset per-class caps, filled evenly across patients and series.

The reference study kept the first N files of each collection, so one long MR study could fill a cap on its
own and the network learnt that patient's anatomy. Here a cap is shared out round-robin: patients take turns
(in a seeded order), each patient's turn goes to its series in turn, and within a series the chosen slices
are spread evenly along it. Same headers + seed -> same choice, whatever order the headers arrive in.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from modality.records import SliceHeader


@dataclass(frozen=True)
class CapResult:
    """Which slices of one dataset x class survive the cap."""

    chosen: list[SliceHeader]
    over_cap: list[SliceHeader]


def _slice_order(header: SliceHeader) -> tuple[str, int]:
    return (header.item.path, header.index)


def spread_evenly(count: int, quota: int) -> list[int]:
    """``quota`` positions out of ``range(count)``, evenly spaced and centred (no bias to either end).

    A series is ordered head-to-foot or foot-to-head depending on the scanner; centring each pick within its
    stride keeps both ends equally represented.
    """
    if quota >= count:
        return list(range(count))
    if quota <= 0:
        return []
    return [((2 * i + 1) * count) // (2 * quota) for i in range(quota)]


def allocate_round_robin(sizes: Sequence[Sequence[int]], cap: int) -> list[list[int]]:
    """How many slices each series gets: ``sizes[p][s]`` slices in series ``s`` of patient ``p``.

    Patients take turns in the given order, one slice per turn, each turn going to that patient's next
    series that still has slices. The result is max-min fair: no patient gets more than another unless the
    other has run out.
    """
    quotas = [[0] * len(series) for series in sizes]
    next_series = [0] * len(sizes)
    left = [sum(series) for series in sizes]
    remaining = cap
    active = [p for p in range(len(sizes)) if left[p] > 0]
    while remaining > 0 and active:
        still_active = []
        for p in active:
            if remaining == 0:
                still_active.append(p)
                continue
            series = sizes[p]
            for step in range(len(series)):
                s = (next_series[p] + step) % len(series)
                if quotas[p][s] < series[s]:
                    quotas[p][s] += 1
                    left[p] -= 1
                    remaining -= 1
                    next_series[p] = s + 1
                    break
            if left[p] > 0:
                still_active.append(p)
        active = still_active
    return quotas


def cap_evenly(headers: Iterable[SliceHeader], cap: int | None, rng_key: str) -> CapResult:
    """Choose at most ``cap`` of ``headers`` (one dataset, one class) evenly across patients and series.

    ``rng_key`` seeds the patient order (e.g. ``"0:site_a:CT"``), so different datasets and classes get
    independent orders from one global seed.
    """
    ordered = sorted(headers, key=_slice_order)
    if cap is None or len(ordered) <= cap:
        return CapResult(chosen=ordered, over_cap=[])
    by_patient: dict[str, dict[str, list[SliceHeader]]] = defaultdict(lambda: defaultdict(list))
    for header in ordered:
        # A missing series UID still has a file: fall back to it so single files do not merge.
        series = header.series_uid or header.item.path
        by_patient[header.patient_id or f"file:{header.item.path}"][series].append(header)
    patients = sorted(by_patient)
    random.Random(rng_key).shuffle(patients)
    series_lists = [[by_patient[p][s] for s in sorted(by_patient[p])] for p in patients]
    quotas = allocate_round_robin([[len(s) for s in series] for series in series_lists], cap)
    chosen: list[SliceHeader] = []
    for series, patient_quotas in zip(series_lists, quotas, strict=True):
        for slices, quota in zip(series, patient_quotas, strict=True):
            chosen.extend(slices[i] for i in spread_evenly(len(slices), quota))
    chosen_ids = {id(h) for h in chosen}
    return CapResult(
        chosen=sorted(chosen, key=_slice_order),
        over_cap=[h for h in ordered if id(h) not in chosen_ids],
    )


def apply_caps(
    headers: Iterable[tuple[SliceHeader, str]],
    caps: Mapping[str, int | None],
    seed: int,
) -> CapResult:
    """Cap every (dataset, class) group of ``(header, class)`` pairs; classes absent from ``caps`` are uncapped."""
    groups: dict[tuple[str, str], list[SliceHeader]] = defaultdict(list)
    for header, cls in headers:
        groups[(header.item.dataset, cls)].append(header)
    chosen: list[SliceHeader] = []
    over: list[SliceHeader] = []
    for (dataset, cls), group in sorted(groups.items()):
        result = cap_evenly(group, caps.get(cls), f"{seed}:{dataset}:{cls}")
        chosen.extend(result.chosen)
        over.extend(result.over_cap)
    return CapResult(chosen=chosen, over_cap=over)
