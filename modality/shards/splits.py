"""Dataset-level splits and the two leakage guards (same patient, same image in two splits).

Every dataset goes wholly to one split, chosen by hand in the pool's YAML: a random per-image split would put
slices of one series on both sides and measure memory, not generalisation. Public sample repositories copy
each other's files, so the YAML alone is not trusted: prepare refuses to write when a patient id or an
identical decoded image would appear in two splits, and names the collision so the YAML can be fixed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from modality.shards import policy
from modality.shards.policy import SPLITS


class LeakageError(RuntimeError):
    """Writing would put the same patient or the same image in two splits."""


def check_split_map(datasets: Iterable[str], split_of: Mapping[str, str]) -> None:
    """Raise ``ValueError`` unless every dataset the sources yield has a valid split.

    Fails before any decoding, naming every missing dataset at once, because a pool edited by hand tends to
    miss several.
    """
    bad = {name: split for name, split in split_of.items() if split not in SPLITS}
    if bad:
        raise ValueError(f"split values must be one of {SPLITS}; got {bad}")
    missing = sorted(set(datasets) - set(split_of))
    if missing:
        raise ValueError(
            f"datasets missing from the pool's `split` map (every dataset must be assigned to one of "
            f"{', '.join(SPLITS)}): {', '.join(missing)}. Add a line `<dataset>: train` (or val/test) per "
            "dataset under `split:` in the pool's configs/dataset/<pool>.yaml; a source joins no split by default, "
            "because where an unseen source lands decides what the figures measure"
        )


@dataclass(frozen=True)
class PatientSighting:
    """Where a patient id was seen: enough to name a collision."""

    patient_id: str
    dataset: str
    split: str
    path: str


def find_patient_collisions(sightings: Iterable[PatientSighting]) -> dict[str, list[PatientSighting]]:
    """Patient ids seen in more than one split, with one example sighting per (dataset, split).

    Placeholder ids (:func:`~modality.shards.policy.is_placeholder_patient_id`) are skipped: they name
    nobody. The identical-image guard still covers files without a usable id.
    """
    seen: dict[str, dict[tuple[str, str], PatientSighting]] = defaultdict(dict)
    for sighting in sightings:
        if policy.is_placeholder_patient_id(sighting.patient_id):
            continue
        seen[sighting.patient_id].setdefault((sighting.dataset, sighting.split), sighting)
    return {
        pid: [where[k] for k in sorted(where)]
        for pid, where in sorted(seen.items())
        if len({split for _, split in where}) > 1
    }


def guard_patients(sightings: Iterable[PatientSighting]) -> None:
    """Raise :class:`LeakageError` naming every patient id present in two splits."""
    collisions = find_patient_collisions(sightings)
    if not collisions:
        return
    lines = [
        f"patient id {pid!r} appears in several splits: "
        + "; ".join(f"{s.dataset} ({s.split}, e.g. {s.path})" for s in where)
        for pid, where in collisions.items()
    ]
    raise LeakageError(
        f"refusing to write: {len(collisions)} patient(s) would leak across splits; put these datasets in "
        "the same split:\n  " + "\n  ".join(lines)
    )


@dataclass(frozen=True)
class ImageSighting:
    """One decoded slice, identified by the hash of its pixels before intensity scaling."""

    pixel_hash: str
    split: str
    dataset: str
    path: str
    index: int


@dataclass(frozen=True)
class Duplicate:
    """A slice dropped because an identical one (``original``) is already in the same split."""

    sighting: ImageSighting
    original: ImageSighting


def guard_identical_images(sightings: Iterable[ImageSighting]) -> list[Duplicate]:
    """Refuse identical images in two splits; return exact duplicates within a split (to drop).

    The first sighting in (dataset, path, index) order is kept, so which copy survives does not depend on
    worker scheduling.
    """
    first: dict[str, dict[str, ImageSighting]] = defaultdict(dict)
    duplicates: list[Duplicate] = []
    for sighting in sorted(sightings, key=lambda s: (s.dataset, s.path, s.index)):
        by_split = first[sighting.pixel_hash]
        if sighting.split in by_split:
            duplicates.append(Duplicate(sighting, by_split[sighting.split]))
        else:
            by_split[sighting.split] = sighting
    leaks = {sha: by_split for sha, by_split in first.items() if len(by_split) > 1}
    if leaks:
        lines = [
            "identical pixels in "
            + " and ".join(f"{s.split}: {s.dataset} {s.path} [{s.index}]" for s in by_split.values())
            for by_split in leaks.values()
        ]
        raise LeakageError(
            f"refusing to write: {len(leaks)} identical image(s) would appear in two splits; put the datasets "
            "holding them in the same split:\n  " + "\n  ".join(sorted(lines))
        )
    return duplicates
