"""Metrics: training-time torchmetrics (``classification``), test-set evaluation (``evaluation``) and
calibration (``calibration``). Import the submodule you need; this package imports nothing heavy."""
