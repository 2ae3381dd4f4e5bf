"""Shards: the shard format, the leakage policy, caps and even sampling, dataset-level splits with leakage
guards, the deterministic tar writer, exact pixel statistics, and the summary/rejects/charts beside the shards.

One job per module: ``policy`` (split names, placeholder patient ids, linked-source groups: the one rule
prepare, crossval, audit and the IDC planner share), ``sampling`` (caps), ``splits`` (split map + guards),
``work`` (per-file decode job and its resumable cache), ``png_codec`` (PNG members), ``decode`` (sample
members back to arrays), ``writer`` (tar shards), ``reader`` (plain sample iteration for audit and crossval),
``listing`` (a split's shards from summary.json), ``stats`` (histogram mean/std), ``summary`` (summary.json,
rejects.csv), ``charts`` (bar charts), ``build`` (the passes chained, used by ``modality.prepare``),
``parts`` (partitioned prepare: each part's record of read and decoded files, and the merge that writes).
``modality.data`` imports this package, never the reverse (tests/test_import_graph.py).
"""
