"""Read back prepared shards sample by sample, for tools that rework a finished pool (audit, crossval).

Training reads shards through the DataModule's fast stage (modality/data/tar_samples.py); these tools want
plain, obviously-correct iteration over every sample with its raw member bytes.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

from modality.shards.decode import decode_sample, sample_image


def read_shard_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: payload})`` per sample, members grouped by key as webdataset does.

    webdataset splits a member name at the first dot of its basename; the prepare writer keeps a sample's
    members adjacent, so grouping consecutive members with the same key is exact.
    """
    current_key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(shard, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if key != current_key and current_key is not None:
                yield current_key, members
                members = {}
            current_key = key
            handle = tar.extractfile(info)
            members[ext] = handle.read() if handle is not None else b""
    if current_key is not None:
        yield current_key, members


def stored_image(members: dict[str, bytes]) -> np.ndarray:  # noqa: F821 - numpy type, imported lazily by decode
    """The stored uint8 image of a sample, whichever member format prepare wrote (png or npy)."""
    return sample_image(decode_sample({ext: members[ext] for ext in ("png", "npy") if ext in members}))
