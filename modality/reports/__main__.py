"""``python -m modality.reports runs=<run or multirun dir> [out=DIR]``: the command is :mod:`modality.reports.cli`."""

from modality.reports.cli import main

main()
