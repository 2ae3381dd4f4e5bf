"""Old home of the shard sample decoder, now :mod:`modality.shards.decode` (the shard format lives in
``shards``; ``data`` imports it, never the reverse). Kept only because :mod:`modality.evaluate` still imports
these two names from here; remove once it imports them from ``modality.shards.decode``."""

from modality.shards.decode import decode_sample, sample_image

__all__ = ["decode_sample", "sample_image"]
