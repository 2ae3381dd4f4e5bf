"""Render a report page in headless Chromium and save a screenshot, to look at what a reader will see.

Usage: python scripts/screenshot_report.py <report.html> [--out shot.png] [--size 1400,2000]
Exit 0 with the screenshot written; 3 when no chromium binary is installed (callers skip cleanly).
The work is :mod:`modality.reports.screenshot`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modality.reports.screenshot import find_browser, screenshot


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
