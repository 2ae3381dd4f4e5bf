"""Deterministic WebDataset tar shards: same samples in the same order -> byte-identical files.

Tar headers carry wall-clock times, user names and umask-dependent modes by default; all are normalised here
(mtime 0, uid/gid 0, empty owner names, mode 0o444, ustar format) so shards can be compared by checksum and
a rerun after a kill can be checked against a clean run. A shard is written under ``*.tar.partial``,
fsynced, and renamed, so a reader never sees a half-written shard under its final name.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

PARTIAL_SUFFIX = ".partial"


def sample_key(dataset: str, path: str, index: int) -> str:
    """A 20-hex-digit key from (dataset, path, slice index): stable, dot-free, unique in practice.

    WebDataset splits member names at the first dot, so keys must not contain one.
    """
    return hashlib.sha1(f"{dataset}\0{path}\0{index}".encode()).hexdigest()[:20]


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def fsync_dir(directory: Path) -> None:
    """Make a rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ShardInfo:
    name: str
    samples: int


@dataclass
class ShardWriter:
    """Write samples for one split into ``{split}-{i:06d}.tar`` files of at most ``max_samples`` samples.

    A sample is a key plus ``(extension, bytes)`` members, written in the given order.
    """

    directory: Path
    split: str
    max_samples: int
    shards: list[ShardInfo] = field(default_factory=list)
    _tar: tarfile.TarFile | None = None
    _handle: io.BufferedWriter | None = None
    _count: int = 0

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ValueError("shard_max_samples must be at least 1")
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def write(self, key: str, members: Sequence[tuple[str, bytes]]) -> None:
        if self._tar is None or self._count >= self.max_samples:
            self._finish_shard()
            self._open_shard()
        assert self._tar is not None
        for ext, payload in members:
            self._tar.addfile(_tar_info(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
        self._count += 1

    def close(self) -> list[ShardInfo]:
        self._finish_shard()
        return self.shards

    def _current_path(self) -> Path:
        return self.directory / shard_name(self.split, len(self.shards))

    def _open_shard(self) -> None:
        partial = self._current_path().with_name(self._current_path().name + PARTIAL_SUFFIX)
        self._handle = partial.open("wb")
        self._tar = tarfile.open(fileobj=self._handle, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - spans many writes
        self._count = 0

    def _finish_shard(self) -> None:
        if self._tar is None or self._handle is None:
            return
        final = self._current_path()
        self._tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(final.with_name(final.name + PARTIAL_SUFFIX), final)
        fsync_dir(self.directory)
        self.shards.append(ShardInfo(final.name, self._count))
        self._tar = self._handle = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None and self._handle is not None:
            # Leave no half shard behind, not even under the partial name.
            self._handle.close()
            partial = self._current_path().with_name(self._current_path().name + PARTIAL_SUFFIX)
            partial.unlink(missing_ok=True)
            self._tar = self._handle = None
