"""Leakage audit over prepared WebDataset shards: ``python -m modality.commands.audit shards_dir=<dir>`` (Hydra app).

A test accuracy is only worth something if no patient, series or image of the test split was also seen in
training. Prepare guards the split by dataset, but public collections re-publish each other's images (the
NEMA samples turn up in half a dozen repositories under different encodings), so this audit reads the
*stored* shards back and checks them independently of how they were made:

- patients (``patient_id``) and series (``series_uid``) that occur in more than one split;
- identical images in more than one split: the SHA-1 of the decoded stored pixels, and the ``pixel_hash``
  prepare recorded from the source pixels (which catches one image stored from two encodings);
- near-duplicates across datasets in different splits: a 64-bit DCT perceptual hash of the stored image
  within ``max_hamming`` bits (4 by default) proposes a pair, and a linear-fit RMS residual of at most
  ``max_rms`` grey levels (3 by default) between their 32x32 thumbnails confirms it. The hash alone is not
  enough on medical slices: measured on the demo pool, different phantoms of one body part (a dark
  background with one bright ellipse) collide by the thousand, with residuals of 4-20 grey levels, while
  re-encoded, noisy or rescaled copies of one image stay under 1 (linear) to 3.8 (clipped rescale).
  Cross-dataset near-duplicates inside one split are counted for information (redundancy, not leakage).

Exit status: 0 when clean, 1 when any leak (or an unreadable sample, which means the audit is incomplete)
is found, 2 when there is nothing to audit. ``audit.json`` holds the full findings. Options: configs/audit.yaml.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import tarfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from modality.paths import CONFIG_DIR
from modality.shards import policy
from modality.shards.decode import IMAGE_EXTENSIONS, decode_json
from modality.shards.reader import read_shard_samples, stored_image
from modality.shards.writer import SHARD_NAME

#: Perceptual hashes of near-constant images all collide; below this grey-level std they are not compared.
MIN_STD_FOR_PHASH = 1.0
THUMBNAIL_SIDE = 32


@dataclass(frozen=True)
class AuditedSample:
    """What the audit keeps of one stored sample."""

    key: str
    split: str
    shard: str
    dataset: str
    patient_id: str
    series_uid: str
    pixel_hash: str  # recorded by prepare from the source pixels ("" when absent)
    stored_sha1: str  # of the decoded stored image, computed here
    phash: int | None  # None for near-constant images
    thumbnail: bytes = b""  # THUMBNAIL_SIDE^2 uint8, to confirm perceptual-hash candidates


@dataclass
class AuditResult:
    """Findings; ``leaks`` counts everything that makes the audit fail."""

    shards: list[str] = field(default_factory=list)
    samples_by_split: dict[str, int] = field(default_factory=dict)
    patients_across_splits: list[dict[str, Any]] = field(default_factory=list)
    series_across_splits: list[dict[str, Any]] = field(default_factory=list)
    identical_images_across_splits: list[dict[str, Any]] = field(default_factory=list)
    recorded_pixel_hash_across_splits: list[dict[str, Any]] = field(default_factory=list)
    near_duplicates_across_splits: list[dict[str, Any]] = field(default_factory=list)
    near_duplicates_across_datasets_same_split: list[dict[str, Any]] = field(default_factory=list)
    near_duplicate_candidates_rejected: int = 0  # hash collisions the thumbnail residual ruled out
    skipped_for_phash: int = 0
    unreadable: list[dict[str, str]] = field(default_factory=list)

    @property
    def leaks(self) -> int:
        return (
            len(self.patients_across_splits)
            + len(self.series_across_splits)
            + len(self.identical_images_across_splits)
            + len(self.recorded_pixel_hash_across_splits)
            + len(self.near_duplicates_across_splits)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.leaks == 0 and not self.unreadable,
            "leaks": self.leaks,
            "shards": self.shards,
            "samples_by_split": self.samples_by_split,
            "patients_across_splits": self.patients_across_splits,
            "series_across_splits": self.series_across_splits,
            "identical_images_across_splits": self.identical_images_across_splits,
            "recorded_pixel_hash_across_splits": self.recorded_pixel_hash_across_splits,
            "near_duplicates_across_splits": self.near_duplicates_across_splits,
            "near_duplicates_across_datasets_same_split": self.near_duplicates_across_datasets_same_split,
            "near_duplicate_candidates_rejected": self.near_duplicate_candidates_rejected,
            "skipped_for_phash_near_constant": self.skipped_for_phash,
            "unreadable": self.unreadable,
        }


# ---------------------------------------------------------------- hashing (pure)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis; rows are frequencies."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    basis = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    return basis


_DCT32 = _dct_matrix(32)


def thumbnail(image: np.ndarray) -> np.ndarray:
    """32x32 uint8 bilinear thumbnail: the input of the hash and of the confirmation step."""
    small = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).resize(
        (THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR
    )
    return np.asarray(small, dtype=np.uint8)


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit DCT hash: 32x32 grey thumbnail, lowest 8x8 frequencies without DC, thresholded at their median.

    More selective than an 8x8 average hash on CT/MR slices, which all look like a bright disc on black.
    """
    pixels = np.asarray(thumbnail(image), dtype=np.float64)
    coeffs = (_DCT32 @ pixels @ _DCT32.T)[:8, :8].ravel()[1:]
    bits = coeffs > np.median(coeffs)
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def stored_pixel_sha1(image: np.ndarray) -> str:
    """SHA-1 of a decoded image including its shape, so PNG and npy copies of one image hash alike."""
    digest = hashlib.sha1(f"{image.shape}{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def linear_fit_rms(a: np.ndarray, b: np.ndarray) -> float:
    """RMS residual (grey levels) of ``b`` after the least-squares fit ``b ~ gain * a + offset``.

    Tolerates re-windowing and re-scaling of one image (a linear intensity change) but not different anatomy.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    design = np.stack([x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    return float(np.sqrt(np.mean(residual**2)))


def near_duplicate_pairs(hashes: Sequence[int], max_hamming: int = 4) -> list[tuple[int, int, int]]:
    """Index pairs ``(i, j, distance)`` with ``i < j`` whose hashes differ in at most ``max_hamming`` bits.

    Candidates come from buckets on ``max_hamming + 1`` bit bands (two hashes within the distance agree
    exactly on at least one band), so the cost stays near-linear instead of all pairs.
    """
    if not hashes:
        return []
    values = np.asarray(hashes, dtype=np.uint64)
    n_bands = max_hamming + 1
    edges = np.linspace(0, 64, n_bands + 1).astype(int)
    found: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int, int]] = []
    for low, high in itertools.pairwise(edges.tolist()):
        mask = np.uint64((1 << int(high - low)) - 1)
        bands = (values >> np.uint64(low)) & mask
        buckets: dict[int, list[int]] = defaultdict(list)
        for index, band in enumerate(bands.tolist()):
            buckets[band].append(index)
        for members in buckets.values():
            if len(members) < 2:
                continue
            idx = np.asarray(members)
            xor = values[idx][:, None] ^ values[idx][None, :]
            dist = np.bitwise_count(xor)
            rows, cols = np.nonzero(np.triu(dist <= max_hamming, k=1))
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                pair = (int(idx[r]), int(idx[c]))
                if pair not in found:
                    found.add(pair)
                    pairs.append((*pair, int(dist[r, c])))
    return sorted(pairs)


# ---------------------------------------------------------------- reading shards


def find_shards(root: Path) -> list[Path]:
    """Shards under ``root`` or ``root/shards`` (prepare's out_dir works too), sorted by name: the files
    named as the shard writer names them (:data:`~modality.shards.writer.SHARD_NAME`), other tars left."""
    folder = root / "shards" if (root / "shards").is_dir() else root
    return sorted(p for p in folder.glob("*.tar") if p.is_file() and SHARD_NAME.fullmatch(p.name))


def _normalised_id(value: Any) -> str:
    """The stripped identifier, or "" for a placeholder: two samples sharing one share nothing. Series UIDs
    and hashes come through the same tools as patient ids, so the one placeholder rule
    (:func:`~modality.shards.policy.is_placeholder_patient_id`) serves them all."""
    return "" if policy.is_placeholder_patient_id(value) else str(value).strip()


def audit_sample(split: str, shard: str, key: str, members: dict[str, bytes]) -> AuditedSample:
    """Decode one sample and compute its hashes; raises ValueError with a reason when it cannot.

    Members are decoded by :mod:`modality.shards.decode`, the shard format's one decoder, so a sample the
    training loader would refuse (a 16-bit PNG, a non-uint8 or non-2-D npy) is unreadable here too.
    """
    if not any(ext in members for ext in IMAGE_EXTENSIONS):
        raise ValueError(f"no png or npy member (members: {sorted(members)})")
    if "json" not in members:
        raise ValueError("no json member")
    meta = decode_json(members["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"json member is a {type(meta).__name__}, not an object")
    image = stored_image(members)
    hashable = float(image.std()) >= MIN_STD_FOR_PHASH
    thumb = thumbnail(image) if hashable else None
    return AuditedSample(
        key=key,
        split=split,
        shard=shard,
        dataset=str(meta.get("dataset", "")),
        patient_id=_normalised_id(meta.get("patient_id")),
        series_uid=_normalised_id(meta.get("series_uid")),
        pixel_hash=_normalised_id(meta.get("pixel_hash") or meta.get("pixel_sha1")),  # older shards: sha1
        stored_sha1=stored_pixel_sha1(image),
        phash=perceptual_hash(image) if hashable else None,
        thumbnail=thumb.tobytes() if thumb is not None else b"",
    )


# ---------------------------------------------------------------- findings (pure)


def _shared_across_splits(samples: Sequence[AuditedSample], attribute: str) -> list[dict[str, Any]]:
    """Values of ``attribute`` seen in more than one split, with where they occur."""
    by_value: dict[str, list[AuditedSample]] = defaultdict(list)
    for sample in samples:
        value = getattr(sample, attribute)
        if value:
            by_value[value].append(sample)
    findings = []
    for value, group in sorted(by_value.items()):
        splits = sorted({s.split for s in group})
        if len(splits) < 2:
            continue
        counts: dict[str, int] = defaultdict(int)
        for s in group:
            counts[s.split] += 1
        findings.append(
            {
                attribute: value,
                "splits": splits,
                "samples_per_split": dict(sorted(counts.items())),
                "datasets": sorted({s.dataset for s in group}),
                "examples": [f"{s.shard}:{s.key}" for s in group[:6]],
            }
        )
    return findings


def _thumb(sample: AuditedSample) -> np.ndarray:
    return np.frombuffer(sample.thumbnail, dtype=np.uint8)


def find_leaks(samples: Sequence[AuditedSample], max_hamming: int = 4, max_rms: float = 3.0) -> AuditResult:
    """All cross-split findings over already hashed samples."""
    result = AuditResult()
    counts: dict[str, int] = defaultdict(int)
    for sample in samples:
        counts[sample.split] += 1
    result.samples_by_split = dict(sorted(counts.items()))
    result.patients_across_splits = _shared_across_splits(samples, "patient_id")
    result.series_across_splits = _shared_across_splits(samples, "series_uid")
    result.identical_images_across_splits = _shared_across_splits(samples, "stored_sha1")
    result.recorded_pixel_hash_across_splits = _shared_across_splits(samples, "pixel_hash")

    hashed = [s for s in samples if s.phash is not None]
    result.skipped_for_phash = len(samples) - len(hashed)
    for i, j, distance in near_duplicate_pairs([s.phash for s in hashed], max_hamming):  # type: ignore[misc]
        a, b = hashed[i], hashed[j]
        if a.dataset == b.dataset:
            continue
        residual = linear_fit_rms(_thumb(a), _thumb(b))
        if residual > max_rms:
            result.near_duplicate_candidates_rejected += 1
            continue
        pair = {
            "hamming": distance,
            "rms_grey_levels": round(residual, 3),
            "a": {"split": a.split, "dataset": a.dataset, "sample": f"{a.shard}:{a.key}"},
            "b": {"split": b.split, "dataset": b.dataset, "sample": f"{b.shard}:{b.key}"},
        }
        if a.split == b.split:
            result.near_duplicates_across_datasets_same_split.append(pair)
        elif a.stored_sha1 != b.stored_sha1:  # identical images are listed already
            result.near_duplicates_across_splits.append(pair)
    return result


def audit_shards(root: Path, max_hamming: int = 4, max_rms: float = 3.0) -> AuditResult:
    """Read every sample of every shard under ``root`` and report leaks."""
    shards = find_shards(root)
    samples: list[AuditedSample] = []
    unreadable: list[dict[str, str]] = []
    for shard in shards:
        split = SHARD_NAME.fullmatch(shard.name).group("split")  # type: ignore[union-attr]
        try:
            for key, members in read_shard_samples(shard):
                try:
                    samples.append(audit_sample(split, shard.name, key, members))
                except (ValueError, OSError, UnicodeDecodeError) as error:
                    unreadable.append({"shard": shard.name, "key": key, "reason": str(error)})
        except (tarfile.TarError, OSError) as error:
            unreadable.append({"shard": shard.name, "key": "", "reason": f"unreadable tar: {error}"})
    result = find_leaks(samples, max_hamming, max_rms)
    result.shards = [s.name for s in shards]
    result.unreadable = unreadable
    return result


# ---------------------------------------------------------------- report


def format_report(result: AuditResult, limit: int = 10) -> str:
    """A human-readable summary; the full lists are in audit.json."""
    lines = [
        f"Audited {sum(result.samples_by_split.values())} samples in {len(result.shards)} shards: "
        + ", ".join(f"{split} {n}" for split, n in result.samples_by_split.items())
    ]
    sections = [
        ("Patients in more than one split", result.patients_across_splits, "patient_id"),
        ("Series in more than one split", result.series_across_splits, "series_uid"),
        (
            "Identical stored images in more than one split",
            result.identical_images_across_splits,
            "stored_sha1",
        ),
        (
            "Same source pixels (recorded pixel_hash) in more than one split",
            result.recorded_pixel_hash_across_splits,
            "pixel_hash",
        ),
    ]
    for title, findings, attribute in sections:
        lines.append(f"{title}: {len(findings)}")
        for finding in findings[:limit]:
            per_split = ", ".join(f"{k} {v}" for k, v in finding["samples_per_split"].items())
            lines.append(
                f"  {finding[attribute]}  [{per_split}]  datasets {', '.join(finding['datasets'])}"
                f"  e.g. {', '.join(finding['examples'][:3])}"
            )
    lines.append(
        f"Near-duplicates across datasets in different splits: {len(result.near_duplicates_across_splits)}"
    )
    for pair in result.near_duplicates_across_splits[:limit]:
        a, b = pair["a"], pair["b"]
        lines.append(
            f"  hamming {pair['hamming']}: {a['split']}/{a['dataset']} {a['sample']}  <->  "
            f"{b['split']}/{b['dataset']} {b['sample']}"
        )
    lines.append(
        "Near-duplicates across datasets within one split (information only): "
        f"{len(result.near_duplicates_across_datasets_same_split)}; hash candidates ruled out by the thumbnail "
        f"residual: {result.near_duplicate_candidates_rejected}; near-constant images not hashed: "
        f"{result.skipped_for_phash}"
    )
    if result.unreadable:
        lines.append(f"Unreadable samples (audit incomplete): {len(result.unreadable)}")
        for entry in result.unreadable[:limit]:
            lines.append(f"  {entry['shard']}:{entry['key']}  {entry['reason']}")
    verdict = "CLEAN" if result.leaks == 0 and not result.unreadable else f"LEAKS FOUND: {result.leaks}"
    lines.append(verdict)
    return "\n".join(lines)


def run_audit(shards_dir: Path, out: Path | None = None, max_hamming: int = 4, max_rms: float = 3.0) -> int:
    """Audit ``shards_dir``, write ``audit.json`` (to ``out``, default ``shards_dir``), print the summary and
    return the exit status (0 clean, 1 leaks or unreadable samples, 2 no shards)."""
    if not find_shards(shards_dir):
        print(f"no shards named <split>-NNNNNN.tar under {shards_dir}", file=sys.stderr)
        return 2
    result = audit_shards(shards_dir, max_hamming, max_rms)
    out_path = out if out is not None else shards_dir / "audit.json"
    if out_path.suffix != ".json":
        out_path = out_path / "audit.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(format_report(result))
    print(f"Full findings: {out_path}")
    return 0 if result.leaks == 0 and not result.unreadable else 1


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="audit")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "shards_dir"):  # 2 like an empty folder, not 1, which means leaks
        print("say which shards to audit: shards_dir=<prepared dir or its shards/>", file=sys.stderr)
        sys.exit(2)
    sys.exit(
        run_audit(
            Path(cfg.shards_dir),
            None if cfg.out is None else Path(cfg.out),
            int(cfg.max_hamming),
            float(cfg.max_rms),
        )
    )


if __name__ == "__main__":
    main()
