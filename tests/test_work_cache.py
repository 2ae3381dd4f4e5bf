"""The decode work cache: one complete file per finished job, incomplete or foreign entries ignored."""

from __future__ import annotations

from pathlib import Path

from modality.shards.work import WorkCache


def test_entry_round_trip_and_members(tmp_path: Path) -> None:
    cache = WorkCache(tmp_path)
    cache.store("k1", {"slices": [{"offset": 3, "length": 2}]}, b"abcdefg")
    assert cache.load("k1") == {"slices": [{"offset": 3, "length": 2}]}
    assert cache.member("k1", 3, 2) == b"de"
    assert [p.name for p in tmp_path.iterdir()] == ["k1.work"]  # one file per entry, no temporaries


def test_truncated_or_foreign_entries_are_redone_not_trusted(tmp_path: Path) -> None:
    cache = WorkCache(tmp_path)
    cache.store("k1", {"a": 1}, b"x" * 100)
    whole = cache.path("k1").read_bytes()
    cache.path("k1").write_bytes(whole[:-1])
    assert cache.load("k1") is None
    cache.path("k2").write_bytes(b"not an entry at all")
    assert cache.load("k2") is None and cache.load("absent") is None


def test_prune_drops_unused_and_old_format_entries(tmp_path: Path) -> None:
    cache = WorkCache(tmp_path)
    for key in ("keep", "stale"):
        cache.store(key, {}, b"")
    (tmp_path / "old.json").write_text("{}")
    (tmp_path / "old.npy").write_bytes(b"")
    assert cache.prune({"keep"}) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.work"]
