"""Old home of the shard listing, now :mod:`modality.shards.listing` (the shard format lives in ``shards``;
``data`` imports it, never the reverse). Kept only because :mod:`modality.evaluate` still imports these two
names from here; remove once it imports them from ``modality.shards.listing``."""

from modality.shards.listing import plan_split, read_summary

__all__ = ["plan_split", "read_summary"]
