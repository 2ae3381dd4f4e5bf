"""``python -m modality.reports <run or multirun dirs...> [--out DIR]``: the command is :mod:`modality.reports.cli`."""

from modality.reports.cli import main

raise SystemExit(main())
