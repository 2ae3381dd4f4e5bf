"""Cross-process locks for folders that several processes may build at once (two DDP ranks, parallel tests)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` beside ``folder``.

    The lock file sits beside the folder, not in it, so a builder may delete and recreate the folder itself.
    flock is advisory and POSIX-only (Linux, macOS), which is where the pipeline runs.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
