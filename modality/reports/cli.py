"""``python -m modality.reports <run or multirun dirs...> [--out DIR]``: the runs table, figures and HTML page."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modality.reports", description=__doc__)
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run folders (with run_summary.json) or multirun folders"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first dir>/report)")
    args = parser.parse_args(argv)

    from modality.reports.report import build_report

    out_dir = args.out if args.out is not None else args.runs[0] / "report"
    try:
        made = build_report(args.runs, out_dir)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    print(made["table"].to_string(index=False))
    for name, path in made["figures"].items():
        print(f"figure {name}: {path}")
    for name, reason in made["skipped"].items():
        print(f"not drawn {name}: {reason}")
    print(f"HTML page: {made['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
