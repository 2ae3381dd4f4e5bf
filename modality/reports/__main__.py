"""``python -m modality.reports`` is the same command as ``python -m modality.report``."""

from modality.reports.cli import main

raise SystemExit(main())
