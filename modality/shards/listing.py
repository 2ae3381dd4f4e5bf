"""Where a split's shards are and how many samples each holds, read from prepare's ``summary.json``.

Training needs the sample counts *before* reading any tar: the number of batches every DDP rank yields per
epoch is fixed from them, so ranks never disagree on when an epoch ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modality.shards.policy import SPLITS
from modality.shards.summary import SUMMARY_NAME
from modality.shards.writer import check_shard_name


@dataclass(frozen=True)
class SplitShards:
    """The shard URLs of one split with their sample counts (same order)."""

    split: str
    urls: tuple[str, ...]
    samples_per_shard: tuple[int, ...]

    @property
    def samples(self) -> int:
        return sum(self.samples_per_shard)


def read_summary(summary_path: str | Path) -> dict[str, Any]:
    """Load ``summary.json``; a clear error names the file when it is missing or malformed."""
    path = Path(summary_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no summary.json at {path}: build the shards first (python -m modality.prepare ...)"
        )
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    for key in ("classes", "splits"):
        if key not in summary:
            raise ValueError(f"{path} lacks the '{key}' field that training needs")
    for split in SPLITS:
        for shard in _listed_shards(summary, split, path):
            check_shard_name(shard.get("name"), path)
    return summary


def _listed_shards(summary: dict[str, Any], split: str, source: Path) -> list[dict[str, Any]]:
    entry = summary["splits"].get(split) if isinstance(summary.get("splits"), dict) else None
    shards = entry.get("shards", []) if isinstance(entry, dict) else []
    if not isinstance(shards, list) or not all(isinstance(shard, dict) for shard in shards):
        raise ValueError(f"{source}: splits.{split}.shards must be a list of {{name, samples}} entries")
    return shards


def shard_url(shard_dir: str, name: str, url_template: str | None) -> str:
    """The URL webdataset opens for one shard; ``name`` must have passed
    :func:`~modality.shards.writer.check_shard_name`.

    Without a template it is the shard's own path, which the loader opens as a file (no shell, no
    subprocess). ``url_template`` (e.g. ``pipe:aws s3 cp s3://bucket/shards/{name} -`` or
    ``https://host/shards/{name}``) is the user's own configuration, for shards that live in an object
    store; webdataset runs a ``pipe:`` template through a shell, which is safe only because a checked name
    holds no character a shell reads as syntax.
    """
    if url_template:
        return url_template.format(name=name)
    return str(Path(shard_dir) / name)


def plan_split(
    summary: dict[str, Any],
    split: str,
    shard_dir: str | Path,
    url_template: str | None = None,
    urls: list[str] | None = None,
) -> SplitShards:
    """The shards of ``split``; explicit ``urls`` replace the listed names but must match them in number."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}', expected one of {SPLITS}")
    entry = summary["splits"].get(split)
    if entry is None:
        return SplitShards(split, (), ())
    source = Path(shard_dir).parent / "summary.json"
    listed = _listed_shards(summary, split, source)
    names = [check_shard_name(shard.get("name"), source) for shard in listed]
    counts = tuple(int(shard["samples"]) for shard in listed)
    if urls is not None:
        if len(urls) != len(names):
            raise ValueError(
                f"{len(urls)} URLs given for split '{split}' but summary.json lists {len(names)} shards; "
                "the per-shard sample counts would not match"
            )
        resolved = tuple(str(url) for url in urls)
    else:
        resolved = tuple(shard_url(str(shard_dir), name, url_template) for name in names)
    return SplitShards(split, resolved, counts)


def listed_shard_paths(prepared_dir: str | Path) -> list[Path]:
    """The shards a prepared folder's summary.json lists (every split), sorted by name, each name checked by
    :func:`plan_split` (:func:`~modality.shards.writer.check_shard_name`): a name that is not a plain shard
    file name is refused with an error, never joined to the folder. Files in ``shards/`` the summary does
    not list (left over, or put there by hand) are not read."""
    prepared_dir = Path(prepared_dir)
    summary = read_summary(prepared_dir / SUMMARY_NAME)
    shard_dir = prepared_dir / "shards"
    return sorted(Path(url) for split in SPLITS for url in plan_split(summary, split, shard_dir).urls)
