"""Where the project's own files live, so entry points work from any working directory."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
CONFIG_DIR = PROJECT_ROOT / "configs"


def shared_data_root() -> Path:
    """The read-only corpus of real public scans (``../shared/data/real`` beside the checkout).

    ``MODALITY_SHARED_DATA`` overrides it, so CI clones in other folders still find it.
    """
    env = os.environ.get("MODALITY_SHARED_DATA")
    if env:
        return Path(env)
    return PROJECT_ROOT.parent / "shared" / "data" / "real"
