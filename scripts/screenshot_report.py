"""Render a report page in headless Chromium and save a screenshot, to look at what a reader will see.

Usage: python scripts/screenshot_report.py <report.html> [--out shot.png] [--size 1400,2000]
Exit 0 with the screenshot written; 3 when no chromium binary is installed (callers skip cleanly).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, out: Path, size: str = "1400,2000", timeout_s: float = 120.0) -> Path:
    """Headless, offline, throwaway profile: the page must render from the file alone."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no chromium binary on PATH")
    with tempfile.TemporaryDirectory() as profile:
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"--window-size={size}",
            page.resolve().as_uri(),
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout_s)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot to {out}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--out", type=Path, default=Path("report_screenshot.png"))
    parser.add_argument("--size", default="1400,2000")
    args = parser.parse_args()
    if find_browser() is None:
        print("chromium not installed; skipping", file=sys.stderr)
        return 3
    print(screenshot(args.page, args.out, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
