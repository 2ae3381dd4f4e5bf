"""Raw BodyPartExamined -> normalised region, from a YAML table (``configs/body_parts/default.yaml``).

BodyPartExamined is free-ish text in practice (``Left Breast``, ``TH CT CHEST WO C``, ``CHESTABDPELVIS``), so
matching ignores case and every non-alphanumeric character, tries the exact alias table first and then an
ordered keyword list; anything else is ``unknown``. The raw value is always kept beside the region.
``coverage_report`` measures the table against the IDC index bundled with idc-index (no network).

The body-part head (``model.body_part=true``) predicts coarser *head regions* (``head_regions`` in the YAML:
abdomen and pelvis pooled, no phantom). :func:`resolve_region` gives a sample its head region from, in order,
the BodyPartExamined tag, the region the source states for the file (a manifest's ``body_part`` column, the
demo generator's phantom) and a dataset-level fact (``body_part`` in ``configs/dataset/<pool>.yaml``); when
none of them names a known region it is ``unknown``, which training masks out of the loss (never guessed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modality.paths import CONFIG_DIR

DEFAULT_BODY_PART_MAP_PATH = CONFIG_DIR / "body_parts" / "default.yaml"

REGIONS = (
    "head_neck",
    "chest",
    "breast",
    "abdomen",
    "pelvis",
    "spine",
    "upper_limb",
    "lower_limb",
    "whole_body",
    "phantom",
    "unknown",
)
UNKNOWN = "unknown"
#: ``InputItem.extra`` key of a region a source knows for a file without reading it (the demo generator's
#: phantom body part): used where the file's own tag names no region, before any dataset-level fact.
SOURCE_REGION_KEY = "body_part_fact"
#: Where a sample's head region came from (``region_from`` in the shards' JSON).
REGION_ORIGINS = ("tag", "source", "dataset", "none")

#: Modality codes whose series are images of a body (what coverage is measured on): the default class
#: map's codes. SEG/RTSTRUCT/SR etc. inherit BodyPartExamined from their source images and would double count.
IMAGE_MODALITIES = ("CT", "MR", "PT", "CR", "DX", "MG")

_NON_ALNUM = re.compile(r"[^0-9A-Z]+")


def body_part_key(raw: str | None) -> str:
    """Case-, space-, underscore- and punctuation-insensitive key of a raw BodyPartExamined value."""
    return _NON_ALNUM.sub("", (raw or "").upper())


@dataclass(frozen=True)
class BodyPartMap:
    """Exact aliases (key -> region) plus ordered substring keywords (keyword -> region)."""

    aliases: Mapping[str, str]
    keywords: Sequence[tuple[str, str]] = ()
    regions: tuple[str, ...] = REGIONS
    #: What the body-part head predicts, and region -> head region where they differ (else the region
    #: itself; a region mapped to ``unknown`` is masked out of the loss). None: the default (see below).
    head_regions: tuple[str, ...] | None = None
    coarse: Mapping[str, str] = field(default_factory=dict)
    _cache: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if UNKNOWN not in self.regions:
            raise ValueError("body part regions must include 'unknown'")
        bad = {
            r for r in list(self.aliases.values()) + [r for _, r in self.keywords] if r not in self.regions
        }
        if bad:
            raise ValueError(f"body part map uses regions not in `regions`: {sorted(bad)}")
        heads = self.head_region_names
        if UNKNOWN in heads or len(set(heads)) != len(heads) or not heads:
            raise ValueError(f"head_regions must be distinct, non-empty and exclude unknown: {list(heads)}")
        if set(self.coarse) - set(self.regions):
            raise ValueError(
                f"`coarse` maps regions not in `regions`: {sorted(set(self.coarse) - set(self.regions))}"
            )
        unmapped = sorted(
            r for r in self.regions if r != UNKNOWN and self.coarse.get(r, r) not in (*heads, UNKNOWN)
        )
        if unmapped:
            raise ValueError(
                f"regions {unmapped} map to no head region: list them under `coarse` (to a head region or "
                "unknown) or add them to head_regions"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BodyPartMap:
        """Build from ``{regions, aliases: {region: [raw, ...]}, keywords: [[substring, region], ...]}``."""
        regions = tuple(str(r) for r in config.get("regions", REGIONS))
        aliases: dict[str, str] = {}
        for region, raws in dict(config.get("aliases") or {}).items():
            for raw in raws:
                key = body_part_key(str(raw))
                if key in aliases and aliases[key] != region:
                    raise ValueError(f"body part alias {raw!r} is listed under {aliases[key]} and {region}")
                aliases[key] = str(region)
        keywords = tuple((body_part_key(str(k)), str(r)) for k, r in (config.get("keywords") or []))
        heads = config.get("head_regions")
        return cls(
            aliases=aliases,
            keywords=keywords,
            regions=regions,
            head_regions=tuple(str(r) for r in heads) if heads else None,
            coarse={str(k): str(v) for k, v in dict(config.get("coarse") or {}).items()},
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> BodyPartMap:
        with open(path, encoding="utf-8") as handle:
            return cls.from_config(yaml.safe_load(handle))

    @classmethod
    def default(cls) -> BodyPartMap:
        return cls.from_yaml(DEFAULT_BODY_PART_MAP_PATH)

    def normalise(self, raw: str | None) -> str:
        """The region of a raw BodyPartExamined value; ``unknown`` when empty or unmatched."""
        key = body_part_key(raw)
        if not key:
            return UNKNOWN
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        region = self.aliases.get(key)
        if region is None:
            region = next((r for keyword, r in self.keywords if keyword and keyword in key), UNKNOWN)
        self._cache[key] = region
        return region

    @property
    def head_region_names(self) -> tuple[str, ...]:
        """The classes of the body-part head (``head_regions``; default: every region but unknown/phantom)."""
        if self.head_regions is not None:
            return self.head_regions
        return tuple(r for r in self.regions if r not in (UNKNOWN, "phantom"))

    def head_region(self, region: str) -> str:
        """The head region of a normalised region (``unknown`` for unknown and for regions mapped to it)."""
        head = self.coarse.get(region, region)
        return head if head in self.head_region_names else UNKNOWN

    def to_dict(self) -> dict[str, Any]:
        """Plain types for summary.json (``{regions, aliases: {region: [keys]}, keywords}``, plus
        ``head_regions`` and ``coarse`` when the table sets them)."""
        by_region: dict[str, list[str]] = {r: [] for r in self.regions}
        for key, region in sorted(self.aliases.items()):
            by_region[region].append(key)
        out: dict[str, Any] = {
            "regions": list(self.regions),
            "aliases": by_region,
            "keywords": [list(k) for k in self.keywords],
        }
        if self.head_regions is not None:
            out["head_regions"] = list(self.head_regions)
        if self.coarse:
            out["coarse"] = dict(sorted(self.coarse.items()))
        return out


def resolve_region(
    tag: str | None,
    stated: str | None,
    dataset_fact: str | None,
    body_part_map: BodyPartMap,
) -> tuple[str, str]:
    """``(head region, origin)`` of one sample: the first of the BodyPartExamined ``tag``, the region the
    source ``stated`` for the file and the ``dataset_fact`` that names a head region; ``(unknown, none)``
    when none does. Origins are :data:`REGION_ORIGINS`.

    The tag comes first: a dataset-level fact fills empty and unmapped tags (``EXTREMITY``, ``OTHER``) but
    never overrides what a file says about itself.
    """
    for origin, raw in (("tag", tag), ("source", stated), ("dataset", dataset_fact)):
        if raw and body_part_key(raw):
            region = body_part_map.head_region(body_part_map.normalise(raw))
            if region != UNKNOWN:
                return region, origin
    return UNKNOWN, "none"


def check_dataset_facts(facts: Mapping[str, str], body_part_map: BodyPartMap) -> dict[str, str]:
    """Dataset -> head region for a pool's ``body_part`` facts; raises when a value names no head region
    (a typo must not silently leave a whole collection unknown)."""
    out = {}
    for dataset, raw in facts.items():
        region = body_part_map.head_region(body_part_map.normalise(str(raw)))
        if region == UNKNOWN:
            raise ValueError(
                f"dataset.body_part.{dataset}: {raw!r} names no head region "
                f"({', '.join(body_part_map.head_region_names)})"
            )
        out[str(dataset)] = region
    return out


def coverage(counts: Iterable[tuple[str | None, int]], body_part_map: BodyPartMap) -> dict[str, Any]:
    """Share of series with a non-empty value that map to a known region (not ``unknown``).

    ``counts`` holds ``(raw value, number of series)`` pairs. Returns the share, the totals and the
    unmapped values with their counts (largest first), so a report can say what is still missing.
    """
    total = known = 0
    unmapped: dict[str, int] = {}
    for raw, n in counts:
        if raw is None or not body_part_key(str(raw)):
            continue
        total += int(n)
        if body_part_map.normalise(str(raw)) == UNKNOWN:
            unmapped[str(raw)] = unmapped.get(str(raw), 0) + int(n)
        else:
            known += int(n)
    return {
        "coverage": known / total if total else 1.0,
        "series_with_value": total,
        "series_mapped": known,
        "unmapped": dict(sorted(unmapped.items(), key=lambda kv: -kv[1])),
    }


def idc_body_part_counts(modalities: Sequence[str] = IMAGE_MODALITIES) -> list[tuple[str | None, int]]:
    """``(BodyPartExamined, series)`` pairs from the IDC index bundled with idc-index (offline).

    Grouped in pandas on ``IDCClient().index`` (one row per series): the same answer as
    ``sql_query("SELECT BodyPartExamined, COUNT(*) ... GROUP BY 1")`` in a fraction of the time.
    """
    from idc_index import IDCClient  # optional dependency (extra `catalog`)

    index = IDCClient().index
    series = index.loc[index["Modality"].isin(list(modalities)), "BodyPartExamined"]
    counts = series.fillna("").astype(str).value_counts()
    return [(raw or None, int(n)) for raw, n in counts.items()]


def coverage_report(
    body_part_map: BodyPartMap | None = None, modalities: Sequence[str] = IMAGE_MODALITIES
) -> dict[str, Any]:
    """Coverage of the body-part table on the image series of the IDC index (target >= 0.95)."""
    return coverage(idc_body_part_counts(modalities), body_part_map or BodyPartMap.default())


if __name__ == "__main__":
    report = coverage_report()
    print(
        f"body-part coverage on IDC image series: {report['coverage']:.4f} "
        f"({report['series_mapped']} of {report['series_with_value']} series with a value)"
    )
    for raw, n in report["unmapped"].items():
        print(f"  unmapped: {raw!r}: {n} series")
