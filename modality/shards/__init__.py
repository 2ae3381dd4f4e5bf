"""Shards: caps and even sampling, dataset-level splits with leakage guards, the deterministic tar writer,
exact pixel statistics, and the summary/rejects/charts written beside the shards.

One job per module: ``sampling`` (caps), ``splits`` (split map + guards), ``work`` (per-file decode job
and its resumable cache), ``writer`` (tar shards), ``stats`` (histogram mean/std), ``summary``
(summary.json, rejects.csv), ``charts`` (bar charts), ``build`` (the passes chained, used by
``modality.prepare``).
"""
