"""``python -m modality.report <run or multirun dirs...> [--out DIR]``: the runs table, figures and HTML page.

The command lives in :mod:`modality.reports.cli` (also ``python -m modality.reports``), so the ``reports``
package never imports this module back.
"""

from __future__ import annotations

import sys

from modality.reports.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
