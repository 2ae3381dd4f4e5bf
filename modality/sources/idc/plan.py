"""Dataset-level split planning over IDC collections: whole collections to train / val / test.

The reference study moved datasets between splits by hand until the bars looked balanced. Here the split is a
deterministic search with explicit, checkable constraints:

1. caps: per collection per class at most ``caps[class]`` images (MR 100k, CT 50k by default), reached by
   sampling slices evenly within every series rather than dropping series, so a capped collection still
   contributes all its patients; an optional total ``budget`` becomes one common cap over every collection
   and class (water-filling), reached the same way;
2. shares: each class's share of its (capped) images in each split lies within ``tolerance`` of the target
   (70/15/15 by default);
3. body parts: each class has at least ``min_body_parts`` known normalised regions in every split;
4. leakage: collections that share a PatientID form one *unit* and always land in the same split;
5. exclusions (simulated, phantom, animal collections) and pins (collection -> split) are honoured.

:func:`check_plan` re-derives every constraint from the series manifest and the catalog, independently of the
search, so tests (and users editing a plan by hand) can verify a plan.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from modality.shards import policy
from modality.shards.policy import SPLITS

#: Columns of the series manifest, in file order.
MANIFEST_COLUMNS = (
    "SeriesInstanceUID",
    "collection_id",
    "PatientID",
    "split",
    "class",
    "Modality",
    "body_part",
    "images",
    "images_kept",
    "slice_step",
    "series_size_MB",
    "series_aws_url",
)

#: Regions that do not count towards body-part diversity.
NON_REGIONS = frozenset({"unknown", "phantom", ""})


class PlanInfeasible(Exception):
    """No assignment meets the constraints; the message names the binding constraint(s)."""


@dataclass(frozen=True)
class PlanConstraints:
    """What a plan must satisfy, and the knobs of the search that finds it."""

    targets: Mapping[str, float] = field(default_factory=lambda: {"train": 0.70, "val": 0.15, "test": 0.15})
    tolerance: float = 0.05
    min_body_parts: int = 2
    caps: Mapping[str, int | None] = field(default_factory=lambda: {"CT": 50_000, "MR": 100_000})
    budget: int | None = None
    exclude: Sequence[str] = ()
    pins: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0
    restarts: int = 12

    def __post_init__(self) -> None:
        if tuple(self.targets) != SPLITS:
            raise ValueError(
                f"targets must name the splits {list(SPLITS)} in that order, got {list(self.targets)}"
            )
        if abs(sum(self.targets.values()) - 1.0) > 1e-6:
            raise ValueError(f"split targets must sum to 1, got {dict(self.targets)}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        bad_pins = {c: s for c, s in self.pins.items() if s not in SPLITS}
        if bad_pins:
            raise ValueError(f"pins must name a split in {list(SPLITS)}: {bad_pins}")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"budget must be positive, got {self.budget}")

    def cap_of(self, cls: str) -> int | None:
        cap = self.caps.get(cls)
        return None if cap is None else int(cap)

    def is_excluded(self, collection: str) -> bool:
        """Exclusions are fnmatch patterns (``*phantom*``, ``pdmr_*``) matched on the collection id."""
        return any(fnmatch.fnmatchcase(collection, pattern) for pattern in self.exclude)


@dataclass
class Plan:
    """A split of whole collections plus the series each keeps and how densely it samples them."""

    splits: dict[str, str]  # collection_id -> split
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, one row per kept series
    units: dict[str, int]  # collection_id -> unit (collections linked by shared PatientIDs)
    classes: tuple[str, ...]


# --- units: collections linked by shared patients -------------------------------------------------------------


def collection_units(series: pd.DataFrame) -> dict[str, int]:
    """Group collections connected by a shared PatientID, numbered in sorted-name order.

    Any patient id present in two collections ties them: a person scanned for two studies (or one
    collection re-published as another) must not be in train and test at once. Placeholder ids
    (:func:`~modality.shards.policy.is_placeholder_patient_id`) tie nothing.
    """
    collections = sorted(str(name) for name in series["collection_id"].unique())
    pairs = series[["PatientID", "collection_id"]].dropna().astype(str).drop_duplicates()
    shared = pairs[pairs.duplicated("PatientID", keep=False)]  # a few hundred of ~570k rows on the real index
    shared = shared[~shared["PatientID"].map(policy.is_placeholder_patient_id).astype(bool)]
    links = zip(shared["collection_id"], shared["PatientID"], strict=True)
    root = policy.connected_groups(collections, links)
    number = {group: i for i, group in enumerate(sorted(set(root.values())))}
    return {name: number[root[name]] for name in collections}


# --- caps and budget: how many images each series keeps ----------------------------------------------------------


def group_targets(series: pd.DataFrame, constraints: PlanConstraints) -> pd.Series:
    """Images to keep per (collection, class): the class cap, then a budget as one common cap over all groups.

    The budget is water-filled: the largest common per-group limit whose total fits the budget. Small
    collections stay whole and large ones are thinned alike, so a budget trades slices per series for
    breadth (collections, patients) instead of shrinking every collection proportionally, which would erase
    the one-image-per-series radiograph collections first.
    """
    images = series.groupby(["collection_id", "class"], observed=True)["instanceCount"].sum()
    caps = [constraints.cap_of(cls) for cls in images.index.get_level_values("class")]
    capped = pd.Series(
        [n if cap is None else min(n, cap) for n, cap in zip(images.to_numpy(), caps, strict=True)],
        index=images.index,
        dtype="int64",
    )
    budget = constraints.budget
    if budget is not None and int(capped.sum()) > budget:
        values = capped.to_numpy()
        low, high = 0, int(values.max())
        while low < high:  # largest common limit whose total fits the budget
            mid = (low + high + 1) // 2
            if int(np.minimum(values, mid).sum()) <= budget:
                low = mid
            else:
                high = mid - 1
        capped = capped.clip(upper=max(low, 1))
    return capped


def _kept_for_step(counts: np.ndarray, step: int) -> int:
    return int(np.ceil(counts / step).sum())


def sample_group(
    counts: np.ndarray, patient_codes: np.ndarray, target: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Images kept and slice step per series of one (collection, class), keeping at most ``target`` images.

    The smallest common step whose evenly spaced slices fit the target keeps every series (every patient).
    When even one slice per series is too many, one slice is kept from ``target`` series chosen round-robin
    over patients in seeded order, so the kept series still spread across as many patients as possible.
    """
    counts = counts.astype("int64")
    total = int(counts.sum())
    if total <= target:
        return counts.copy(), np.ones_like(counts)
    if len(counts) <= target:
        low, high = 1, int(counts.max())
        while low < high:  # smallest step with sum(ceil(n / step)) <= target; the sum falls as step grows
            mid = (low + high) // 2
            if _kept_for_step(counts, mid) <= target:
                high = mid
            else:
                low = mid + 1
        kept = np.ceil(counts / low).astype("int64")
        steps = np.where(kept > 1, low, np.maximum(counts, 1))
        return kept, steps
    kept = np.zeros_like(counts)
    order = rng.permutation(len(counts))
    # rank of each series within its patient (seeded order), then take rank 0 of every patient, rank 1...
    patients_in_order = patient_codes[order]
    rank = pd.Series(patients_in_order).groupby(patients_in_order).cumcount().to_numpy()
    patient_order = rng.permutation(int(patient_codes.max()) + 1) if len(patient_codes) else np.array([], int)
    chosen = order[np.lexsort((patient_order[patients_in_order], rank))][:target]
    kept[chosen] = 1
    return kept, np.where(kept > 0, np.maximum(counts, 1), 0)


def sample_series(series: pd.DataFrame, constraints: PlanConstraints) -> pd.DataFrame:
    """``series`` with ``images_kept`` and ``slice_step`` columns (0 kept: the series is left out)."""
    series = series.sort_values(["collection_id", "class", "SeriesInstanceUID"]).reset_index(drop=True)
    targets = group_targets(series, constraints)
    kept = np.zeros(len(series), dtype="int64")
    steps = np.ones(len(series), dtype="int64")
    rng = np.random.default_rng(constraints.seed)
    patient_codes = pd.factorize(series["PatientID"])[0]
    counts = series["instanceCount"].to_numpy()
    for (collection, cls), rows in series.groupby(
        ["collection_id", "class"], sort=True, observed=True
    ).indices.items():
        group_kept, group_steps = sample_group(
            counts[rows], pd.factorize(patient_codes[rows])[0], int(targets[(collection, cls)]), rng
        )
        kept[rows] = group_kept
        steps[rows] = group_steps
    series = series.copy()
    series["images_kept"] = kept
    series["slice_step"] = steps
    return series


# --- the search -----------------------------------------------------------------------------------------------


@dataclass
class _Problem:
    """Per-unit class totals and body-part presence as arrays, so each candidate costs two matrix products."""

    unit_ids: list[int]
    images: np.ndarray  # units x classes (kept images)
    region_cube: np.ndarray  # units x classes x regions, 1 where the unit has the region for the class
    totals: np.ndarray  # classes
    targets: np.ndarray  # splits
    tolerance: float
    min_body_parts: int
    n_classes: int
    n_regions: int
    fixed: dict[int, int]  # unit index -> split index (pins)


def _build_problem(
    kept: pd.DataFrame, units: Mapping[str, int], classes: Sequence[str], constraints: PlanConstraints
) -> tuple[_Problem, list[str]]:
    unit_of = kept["collection_id"].astype(str).map(units)
    unit_ids = sorted(unit_of.unique())
    position = {unit: i for i, unit in enumerate(unit_ids)}
    rows = unit_of.map(position).to_numpy(dtype=int)
    class_index = kept["class"].astype(str).map({cls: i for i, cls in enumerate(classes)}).to_numpy(dtype=int)
    images = np.zeros((len(unit_ids), len(classes)))
    np.add.at(images, (rows, class_index), kept["images_kept"].to_numpy())
    body_parts = kept["body_part"].astype(str)
    region_names = sorted(set(body_parts) - NON_REGIONS)
    region_index = {name: i for i, name in enumerate(region_names)}
    region_cube = np.zeros((len(unit_ids), len(classes), max(len(region_names), 1)))
    known = body_parts.isin(list(region_index)).to_numpy()
    region_cube[rows[known], class_index[known], body_parts[known].map(region_index).to_numpy(dtype=int)] = 1
    fixed: dict[int, int] = {}
    for collection, split in constraints.pins.items():
        if collection in units and units[collection] in position:
            unit = position[units[collection]]
            wanted = SPLITS.index(split)
            if fixed.get(unit, wanted) != wanted:
                raise PlanInfeasible(
                    f"pins: collections tied by shared patients are pinned to different splits ({collection} -> {split})"
                )
            fixed[unit] = wanted
    problem = _Problem(
        unit_ids=unit_ids,
        images=images,
        region_cube=region_cube,
        totals=images.sum(axis=0),
        targets=np.array([constraints.targets[s] for s in SPLITS]),
        tolerance=constraints.tolerance,
        min_body_parts=constraints.min_body_parts,
        n_classes=len(classes),
        n_regions=max(len(region_names), 1),
        fixed=fixed,
    )
    return problem, region_names


def _evaluate(problem: _Problem, filled: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(violation, spread) for a batch of candidates: ``filled`` is (..., splits, classes) image sums and
    ``regions`` (..., splits, classes, regions) unit counts. Violation > 0 breaks a constraint; spread centres
    the shares on their targets once every constraint holds."""
    shares = filled / np.maximum(problem.totals, 1)
    deviation = np.abs(shares - problem.targets[:, None])
    share_excess = np.maximum(deviation - problem.tolerance, 0).sum(axis=(-2, -1))
    region_counts = (regions > 0).sum(axis=-1)
    region_deficit = np.maximum(problem.min_body_parts - region_counts, 0).sum(axis=(-2, -1))
    return share_excess * 100 + region_deficit, (deviation**2).sum(axis=(-2, -1))


def _state(problem: _Problem, assign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    onehot = np.zeros((len(SPLITS), len(assign)))
    onehot[assign, np.arange(len(assign))] = 1
    return onehot @ problem.images, np.einsum("su,ukr->skr", onehot, problem.region_cube)


def _best_move(
    problem: _Problem, assign: np.ndarray, units: np.ndarray, targets: np.ndarray
) -> tuple[float, float, np.ndarray] | None:
    """Best of the candidate moves ``units[i] -> targets[i]``, evaluated in one batch."""
    keep = assign[units] != targets
    units, targets = units[keep], targets[keep]
    if not len(units):
        return None
    filled, regions = _state(problem, assign)
    eye = np.eye(len(SPLITS))
    change = eye[targets] - eye[assign[units]]  # (m, splits): -1 where the unit leaves, +1 where it lands
    moved_filled = filled + change[:, :, None] * problem.images[units][:, None, :]
    moved_regions = regions + change[:, :, None, None] * problem.region_cube[units][:, None, :, :]
    violation, spread = _evaluate(problem, moved_filled, moved_regions)
    best = int(np.lexsort((spread, violation))[0])
    new = assign.copy()
    new[units[best]] = targets[best]
    return float(violation[best]), float(spread[best]), new


def _best_swap(
    problem: _Problem, assign: np.ndarray, free: np.ndarray
) -> tuple[float, float, np.ndarray] | None:
    """Best exchange of two free units in different splits, evaluated in one batch."""
    first, second = np.triu_indices(len(free), k=1)
    first, second = free[first], free[second]
    keep = assign[first] != assign[second]
    first, second = first[keep], second[keep]
    if not len(first):
        return None
    filled, regions = _state(problem, assign)
    eye = np.eye(len(SPLITS))
    change = eye[assign[second]] - eye[assign[first]]  # the first unit goes to the second's split and back
    delta_images = problem.images[first] - problem.images[second]
    delta_regions = problem.region_cube[first] - problem.region_cube[second]
    violation, spread = _evaluate(
        problem,
        filled + change[:, :, None] * delta_images[:, None, :],
        regions + change[:, :, None, None] * delta_regions[:, None, :, :],
    )
    best = int(np.lexsort((spread, violation))[0])
    new = assign.copy()
    new[first[best]], new[second[best]] = assign[second[best]], assign[first[best]]
    return float(violation[best]), float(spread[best]), new


def _random_start(problem: _Problem, rng: np.random.Generator) -> np.ndarray:
    """Seeded random assignment drawn with the target proportions (pins applied)."""
    assign = rng.choice(len(SPLITS), size=len(problem.unit_ids), p=problem.targets)
    for unit, split in problem.fixed.items():
        assign[unit] = split
    return assign


def _improves(candidate: tuple[float, float, np.ndarray] | None, cost: tuple[float, float]) -> bool:
    """Lexicographically lower (violation, spread), beyond float noise, so descent always terminates."""
    if candidate is None:
        return False
    violation, spread = candidate[0], candidate[1]
    if violation < cost[0] - 1e-9:
        return True
    return abs(violation - cost[0]) <= 1e-9 and spread < cost[1] - 1e-12


def _descend(problem: _Problem, assign: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Steepest descent: the best single move while one improves, then the best swap (costlier to scan)."""
    free = np.array([u for u in range(len(assign)) if u not in problem.fixed], dtype=int)
    move_units = np.repeat(free, len(SPLITS))
    move_targets = np.tile(np.arange(len(SPLITS)), len(free))
    filled, regions = _state(problem, assign)
    violation, spread = _evaluate(problem, filled, regions)
    cost = (float(violation), float(spread))
    while True:
        step = _best_move(problem, assign, move_units, move_targets)
        if not _improves(step, cost):
            step = _best_swap(problem, assign, free)
        if not _improves(step, cost):
            return assign, cost
        assert step is not None
        assign, cost = step[2], (step[0], step[1])


def _search(problem: _Problem, seed: int, restarts: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Best of a greedy start and ``restarts`` seeded random starts, each improved by steepest descent."""
    rng = np.random.default_rng(seed)
    best_assign, best_cost = None, (math.inf, math.inf)
    starts = [_greedy_start(problem, rng)] + [_random_start(problem, rng) for _ in range(max(restarts, 0))]
    for start in starts:
        assign, cost = _descend(problem, start)
        if cost < best_cost:
            best_assign, best_cost = assign.copy(), cost
    assert best_assign is not None
    return best_assign, best_cost


def _greedy_start(problem: _Problem, rng: np.random.Generator) -> np.ndarray:
    """Largest units first, each to the split furthest below its targets, with seeded tie noise."""
    n_units = len(problem.unit_ids)
    assign = np.zeros(n_units, dtype=int)
    filled = np.zeros((len(SPLITS), problem.n_classes))
    relative = problem.images / np.maximum(problem.totals, 1)
    order = np.argsort(-(relative.max(axis=1) + rng.uniform(0, 1e-3, n_units)), kind="stable")
    for unit, split in problem.fixed.items():
        assign[unit] = split
        filled[split] += relative[unit]
    for unit in order:
        if unit in problem.fixed:
            continue
        deficit = (problem.targets[:, None] - filled) * (relative[unit] > 0)
        score = deficit.sum(axis=1) + rng.uniform(0, 1e-3, len(SPLITS))
        split = int(np.argmax(score))
        assign[unit] = split
        filled[split] += relative[unit]
    return assign


# --- feasibility diagnostics --------------------------------------------------------------------------------------


def _shares_reachable(
    problem: _Problem, share: np.ndarray, resolution: float = 0.001, slack: float = 0.01
) -> bool:
    """Can whole units give one class shares near every split's target? (a necessary condition)

    Subset-sum over the two smallest splits' shares on a grid of ``resolution``, the largest split taking the
    rest; pins are honoured. ``slack`` absorbs the rounding, so a False here is certain to bind (up to slack),
    while True only means the class alone does not rule a plan out.
    """
    order = np.argsort(problem.targets)
    small_a, small_b, large = (int(i) for i in order)
    bounds = [
        (problem.targets[i] - problem.tolerance - slack, problem.targets[i] + problem.tolerance + slack)
        for i in range(len(SPLITS))
    ]
    size_a = int(np.ceil(bounds[small_a][1] / resolution)) + 1
    size_b = int(np.ceil(bounds[small_b][1] / resolution)) + 1
    reach = np.zeros((size_a, size_b), dtype=bool)
    reach[0, 0] = True
    for unit, value in enumerate(share):
        step = round(float(value) / resolution)
        pinned = problem.fixed.get(unit)
        if step == 0 or pinned == large:
            continue
        to_a = np.zeros_like(reach)
        to_b = np.zeros_like(reach)
        if step < size_a:
            to_a[step:, :] = reach[:-step, :]
        if step < size_b:
            to_b[:, step:] = reach[:, :-step]
        reach = (
            {small_a: to_a, small_b: to_b}.get(pinned, reach | to_a | to_b)
            if pinned is not None
            else reach | to_a | to_b
        )
    a_values = np.arange(size_a)[:, None] * resolution
    b_values = np.arange(size_b)[None, :] * resolution
    rest = 1.0 - a_values - b_values
    inside = (
        (a_values >= bounds[small_a][0])
        & (b_values >= bounds[small_b][0])
        & (rest >= bounds[large][0])
        & (rest <= bounds[large][1])
    )
    return bool((reach & inside).any())


def _obvious_infeasibility(
    problem: _Problem, classes: Sequence[str], region_names: Sequence[str], unit_names: Mapping[int, str]
) -> list[str]:
    """Constraints no search can meet, found before searching so the message names the cause."""
    reasons = []
    ceiling = problem.targets.max() + problem.tolerance
    for k, cls in enumerate(classes):
        if problem.totals[k] == 0:
            reasons.append(f"class {cls}: no images after exclusions; every split needs it")
            continue
        share = problem.images[:, k] / problem.totals[k]
        worst = int(np.argmax(share))
        if share[worst] > ceiling:
            reasons.append(
                f"class share: {unit_names[problem.unit_ids[worst]]} holds {share[worst]:.0%} of {cls} images after caps, "
                f"above the largest split's ceiling {ceiling:.0%}; cap {cls} lower (caps.{cls}) or exclude it"
            )
        holders = int((share > 0).sum())
        if holders < len(SPLITS):
            reasons.append(
                f"class share: only {holders} unit(s) have {cls} images; each of {len(SPLITS)} splits needs some"
            )
        elif not _shares_reachable(problem, share):
            largest = ", ".join(
                f"{unit_names[problem.unit_ids[u]]} {share[u]:.0%}" for u in np.argsort(-share)[:4]
            )
            reasons.append(
                f"class share: no grouping of whole collections gives {cls} a share within "
                f"{problem.tolerance:.0%} of every split's target (largest: {largest}); cap {cls} lower "
                f"(caps.{cls}), widen the tolerance, or exclude a large collection"
            )
        distinct = int((problem.region_cube[:, k, :].sum(axis=0) > 0).sum())
        if distinct < problem.min_body_parts:
            reasons.append(
                f"body parts: {cls} has {distinct} known region(s) in all collections, fewer than min_body_parts="
                f"{problem.min_body_parts}"
            )
    return reasons


# --- public API ---------------------------------------------------------------------------------------------------


def excluded_rows(series: pd.DataFrame, constraints: PlanConstraints) -> pd.Series:
    """Boolean mask of rows whose collection is excluded (patterns matched once per collection)."""
    names = pd.unique(series["collection_id"])
    excluded = [name for name in names if constraints.is_excluded(str(name))]
    return series["collection_id"].isin(excluded)  # fast on the catalog's categorical column


def plan_collections(series: pd.DataFrame, classes: Sequence[str], constraints: PlanConstraints) -> Plan:
    """Assign every non-excluded collection of ``series`` (output of ``select_image_series``) to a split.

    Raises :class:`PlanInfeasible` naming the binding constraint(s) when the best assignment found still breaks
    one.
    """
    unknown_pins = sorted(set(constraints.pins) - set(series["collection_id"]))
    if unknown_pins:
        raise PlanInfeasible(f"pins: collections not in the catalog: {unknown_pins}")
    excluded_pins = sorted(c for c in constraints.pins if constraints.is_excluded(c))
    if excluded_pins:
        raise PlanInfeasible(f"pins: collections both pinned and excluded: {excluded_pins}")
    candidates = series[~excluded_rows(series, constraints)]
    if candidates.empty:
        raise PlanInfeasible("exclusions: every collection is excluded")
    units = collection_units(candidates)
    sampled = sample_series(candidates, constraints)
    kept = sampled[sampled["images_kept"] > 0]
    problem, region_names = _build_problem(kept, units, classes, constraints)
    unit_names = {
        unit: "+".join(sorted(c for c, u in units.items() if u == unit)) for unit in problem.unit_ids
    }
    reasons = _obvious_infeasibility(problem, classes, region_names, unit_names)
    if reasons:
        raise PlanInfeasible("no feasible plan:\n  " + "\n  ".join(reasons))
    assign, _ = _search(problem, constraints.seed, constraints.restarts)
    split_of_unit = {unit: SPLITS[assign[i]] for i, unit in enumerate(problem.unit_ids)}
    # a collection whose images were all capped away still belongs to its unit's split (patients!)
    splits = {c: split_of_unit.get(u, "train") for c, u in sorted(units.items())}
    manifest = kept.assign(split=kept["collection_id"].map(splits), images=kept["instanceCount"])
    for column in MANIFEST_COLUMNS:
        if column not in manifest.columns:
            manifest[column] = ""
    plan = Plan(
        splits=splits,
        manifest=manifest[list(MANIFEST_COLUMNS)].reset_index(drop=True),
        units=units,
        classes=tuple(classes),
    )
    violations = check_plan(plan, series, constraints)
    if violations:
        raise PlanInfeasible("best plan found still breaks constraints:\n  " + "\n  ".join(violations))
    return plan


def split_shares(manifest: pd.DataFrame) -> pd.DataFrame:
    """Kept images per split x class, and each class's share per split."""
    table = manifest.pivot_table(
        index="split", columns="class", values="images_kept", aggfunc="sum", fill_value=0
    )
    return table.reindex([s for s in SPLITS if s in table.index])


def check_plan(plan: Plan, catalog: pd.DataFrame, constraints: PlanConstraints) -> list[str]:
    """Every constraint the plan breaks, as readable lines (empty list: the plan is valid).

    Independent of the search: recomputes shares, caps, body parts and patient placement from the manifest
    and the catalog series table (``select_image_series`` output), trusting nothing the planner computed.
    """
    violations: list[str] = []
    manifest = plan.manifest
    splits = plan.splits
    bad_split = sorted({s for s in splits.values() if s not in SPLITS})
    if bad_split:
        violations.append(f"splits: unknown split names {bad_split}")
    catalog_collections = set(catalog["collection_id"])
    planned = set(splits)
    excluded_planned = sorted(c for c in planned if constraints.is_excluded(c))
    if excluded_planned:
        violations.append(f"exclusions: excluded collections are planned: {excluded_planned}")
    missing = sorted(c for c in catalog_collections - planned if not constraints.is_excluded(c))
    if missing:
        violations.append(f"coverage: collections neither planned nor excluded: {missing[:10]}")
    for collection, split in constraints.pins.items():
        if splits.get(collection) != split:
            violations.append(f"pins: {collection} pinned to {split} but planned to {splits.get(collection)}")
    mismatched = manifest["split"] != manifest["collection_id"].map(splits)
    if mismatched.any():
        violations.append(
            f"manifest: {int(mismatched.sum())} series whose split differs from their collection's"
        )

    # a hash join, not an index lookup: ~250k string keys on pyarrow-backed columns
    truth_columns = ["SeriesInstanceUID", "class", "collection_id", "instanceCount", "body_part"]
    reference = catalog[truth_columns].astype({"class": str, "collection_id": str, "body_part": str})
    joined = manifest[["SeriesInstanceUID"]].merge(reference, on="SeriesInstanceUID", how="left", sort=False)
    if len(joined) != len(manifest):
        violations.append("catalog: SeriesInstanceUID is not unique in the catalog")
        return violations
    unknown_series = joined["instanceCount"].isna().to_numpy()
    if unknown_series.any():
        violations.append(f"manifest: {int(unknown_series.sum())} series not in the catalog")
    known = manifest[~unknown_series]
    truth = joined[~unknown_series]
    wrong_class = (truth["class"].to_numpy() != known["class"].astype(str).to_numpy()) | (
        truth["collection_id"].to_numpy() != known["collection_id"].astype(str).to_numpy()
    )
    if wrong_class.any():
        violations.append(
            f"manifest: {int(wrong_class.sum())} series with a class or collection unlike the catalog"
        )
    over = known["images_kept"].to_numpy() > truth["instanceCount"].to_numpy()
    if over.any() or (manifest["images_kept"] < 1).any():
        violations.append("manifest: images_kept outside 1..instanceCount")

    per_group = known.groupby(["collection_id", "class"], observed=True)
    for (collection, cls), kept in per_group["images_kept"].sum().items():
        cap = constraints.cap_of(cls)
        if cap is not None and kept > cap:
            violations.append(f"caps: {collection} keeps {kept} {cls} images, above the cap {cap}")
    total = int(known["images_kept"].sum())
    if constraints.budget is not None and total > constraints.budget:
        violations.append(f"budget: {total} images kept, above the budget {constraints.budget}")

    classes = sorted({str(cls) for cls in catalog["class"].unique()})
    images = known.pivot_table(
        index="split", columns="class", values="images_kept", aggfunc="sum", fill_value=0, observed=True
    )
    images = images.reindex(index=list(SPLITS), columns=classes, fill_value=0)
    for cls in classes:
        class_total = images[cls].sum()
        for split in SPLITS:
            share = images.at[split, cls] / class_total if class_total else 0.0
            target = constraints.targets[split]
            if abs(share - target) > constraints.tolerance + 1e-9:
                violations.append(
                    f"shares: {cls} has {share:.1%} of its images in {split}, outside {target:.0%} ± {constraints.tolerance:.0%}"
                )
    regions = pd.DataFrame(
        {
            "class": known["class"].astype(str).to_numpy(),
            "split": known["split"].astype(str).to_numpy(),
            "body_part": truth["body_part"].to_numpy(),
        }
    )
    regions = regions[~regions["body_part"].isin(list(NON_REGIONS))]
    region_counts = regions.groupby(["class", "split"])["body_part"].nunique()
    for cls in classes:
        for split in SPLITS:
            count = int(region_counts.get((cls, split), 0))
            if count < constraints.min_body_parts:
                violations.append(
                    f"body parts: {cls} has {count} known region(s) in {split}, fewer than {constraints.min_body_parts}"
                )

    placed = catalog[catalog["collection_id"].isin(list(planned))]
    split_codes = (
        placed["collection_id"]
        .astype(str)
        .map({c: SPLITS.index(s) for c, s in splits.items() if s in SPLITS})
    )
    patient_splits = pd.DataFrame(
        {"patient": placed["PatientID"].to_numpy(), "split": split_codes.to_numpy()}
    )
    patient_splits = patient_splits.drop_duplicates().groupby("patient")["split"].nunique()
    leaking = patient_splits[patient_splits > 1]
    # the planner's own rule (collection_units): an id that names nobody links nothing, so it leaks nothing
    leaking = leaking[
        np.array([not policy.is_placeholder_patient_id(pid) for pid in leaking.index], dtype=bool)
    ]
    if len(leaking):
        violations.append(
            f"patients: {len(leaking)} patient id(s) in more than one split, e.g. {list(leaking.index[:5])}"
        )
    return violations


# --- outputs --------------------------------------------------------------------------------------------------


PLAN_NAME = "plan.yaml"
MANIFEST_NAME = "series_manifest.csv"
SUMMARY_NAME = "plan_summary.json"
CHART_NAME = "plan.png"
DATASET_NAME = "dataset.yaml"


def plan_summary(plan: Plan, constraints: PlanConstraints) -> dict[str, Any]:
    """Plain-type record of what the plan keeps: images, series, patients and regions per split and class."""
    manifest = plan.manifest
    by_split: dict[str, Any] = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        by_class = {}
        for cls in plan.classes:
            class_rows = rows[rows["class"].astype(str) == cls]
            by_class[cls] = {
                "images_kept": int(class_rows["images_kept"].sum()),
                "series": len(class_rows),
                "patients": int(class_rows["PatientID"].nunique()),
                "collections": int(class_rows["collection_id"].nunique()),
                "body_parts": sorted(set(class_rows["body_part"].astype(str)) - NON_REGIONS),
            }
        by_split[split] = {
            "collections": sorted(c for c, s in plan.splits.items() if s == split),
            "by_class": by_class,
        }
    totals = {cls: sum(by_split[s]["by_class"][cls]["images_kept"] for s in SPLITS) for cls in plan.classes}
    shares = {
        split: {
            cls: (by_split[split]["by_class"][cls]["images_kept"] / totals[cls] if totals[cls] else 0.0)
            for cls in plan.classes
        }
        for split in SPLITS
    }
    return {
        "constraints": {
            "targets": dict(constraints.targets),
            "tolerance": constraints.tolerance,
            "min_body_parts": constraints.min_body_parts,
            "caps": {k: (None if v is None else int(v)) for k, v in constraints.caps.items()},
            "budget": constraints.budget,
            "exclude": list(constraints.exclude),
            "pins": dict(constraints.pins),
            "seed": constraints.seed,
        },
        "classes": list(plan.classes),
        "images_kept": int(manifest["images_kept"].sum()),
        "size_mb_to_download": round(float(manifest["series_size_MB"].sum()), 1),
        "shares": shares,
        "splits": by_split,
    }


def draw_plan_chart(plan: Plan, path: Path, constraints: PlanConstraints | None = None) -> None:
    """Left: each class's share of its images per split against the target band (the balance the planner
    checks; a thin class like XR is visible here). Right: kept images per class per split, stacked by
    collection (the reference study's figure, planned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPLITS) + 1, figsize=(5 * (len(SPLITS) + 1), 4))
    totals = split_shares(plan.manifest).reindex(index=list(SPLITS), columns=list(plan.classes), fill_value=0)
    shares = totals / totals.sum().replace(0, 1)
    width = 0.8 / len(SPLITS)
    positions = np.arange(len(plan.classes))
    for i, split in enumerate(SPLITS):
        axes[0].bar(positions + (i - 1) * width, shares.loc[split].to_numpy(), width, label=split)
        if constraints is not None:
            target = constraints.targets[split]
            axes[0].axhspan(
                target - constraints.tolerance, target + constraints.tolerance, alpha=0.08, color=f"C{i}"
            )
    axes[0].set_xticks(positions, list(plan.classes))
    axes[0].set_ylabel("share of the class's images")
    axes[0].set_title("class share per split (bands: target ± tolerance)")
    axes[0].legend()
    for axis, split in zip(axes[1:], SPLITS, strict=True):
        rows = plan.manifest[plan.manifest["split"] == split]
        table = rows.pivot_table(
            index="class",
            columns="collection_id",
            values="images_kept",
            aggfunc="sum",
            fill_value=0,
            observed=True,
        ).reindex(list(plan.classes), fill_value=0)
        bottom = np.zeros(len(table))
        for collection in table.columns:
            values = table[collection].to_numpy()
            axis.bar(table.index.astype(str), values, bottom=bottom, linewidth=0.2, edgecolor="white")
            bottom += values
        axis.set_title(
            f"{split}: {int(bottom.sum()):,} images, {rows['collection_id'].nunique()} collections"
        )
        axis.set_ylabel("images kept (stacked by collection)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dataset_pool_config(
    plan: Plan, download_root: str, manifest_path: str, constraints: PlanConstraints
) -> dict[str, Any]:
    """A ``configs/dataset/<pool>.yaml`` mapping that prepares the downloaded series with the plan's split."""
    return {
        "name": "idc_plan",
        "sources": [
            {
                "_target_": "modality.sources.idc.download.IDCDownloadSource",
                "root": download_root,
                "manifest": manifest_path,
            }
        ],
        "split": dict(sorted(plan.splits.items())),
        "caps": {k: (None if v is None else int(v)) for k, v in constraints.caps.items()},
    }


def write_plan(
    plan: Plan, out_dir: str | Path, constraints: PlanConstraints, download_root: str
) -> dict[str, Path]:
    """Write plan.yaml (collection -> split), the series manifest, plan_summary.json, the chart and dataset.yaml.

    Files are written to a temporary name and renamed, so a reader never sees half a plan.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "plan": out / PLAN_NAME,
        "manifest": out / MANIFEST_NAME,
        "summary": out / SUMMARY_NAME,
        "chart": out / "charts" / CHART_NAME,
        "dataset": out / DATASET_NAME,
    }
    header = (
        "# collection -> split, from python -m modality.commands.idc_plan (seed "
        f"{constraints.seed}); usable as a dataset pool's `split:`\n"
    )
    _write_text(paths["plan"], header + yaml.safe_dump(dict(sorted(plan.splits.items())), sort_keys=False))
    _write_text(paths["manifest"], plan.manifest.to_csv(index=False))
    _write_text(paths["summary"], json.dumps(plan_summary(plan, constraints), indent=2) + "\n")
    pool = dataset_pool_config(plan, download_root, str(paths["manifest"]), constraints)
    _write_text(
        paths["dataset"],
        "# generated by python -m modality.commands.idc_plan\n" + yaml.safe_dump(pool, sort_keys=False),
    )
    draw_plan_chart(plan, paths["chart"], constraints)
    return paths


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
