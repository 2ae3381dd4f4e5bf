"""The decode work cache: complete batch files only, incomplete or foreign files ignored, prune keeps the live."""

from __future__ import annotations

from pathlib import Path

from modality.shards.work import WorkCache


def _result(*lengths: int) -> dict:
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    return {
        "slices": [
            {"index": i, "offset": o, "length": n}
            for i, (o, n) in enumerate(zip(offsets, lengths, strict=True))
        ]
    }


def test_batch_round_trip_and_members(tmp_path: Path) -> None:
    cache = WorkCache(tmp_path)
    cache.store_batch([("k1", _result(2, 3), b"abcde"), ("k2", _result(4), b"wxyz")])
    assert [p.suffix for p in tmp_path.iterdir()] == [".work"]  # one file for the batch, no temporaries
    fresh = WorkCache(tmp_path)  # another process: finds the entries by scanning the folder
    assert fresh.cached_keys() == ["k1", "k2"]
    assert fresh.load("k1") == _result(2, 3) and fresh.load("k2") == _result(4)
    assert fresh.member("k1", 2, 3) == b"cde" and fresh.member("k2", 0, 4) == b"wxyz"
    assert fresh.load("absent") is None


def test_worker_locations_reach_the_parent_without_a_rescan(tmp_path: Path) -> None:
    parent = WorkCache(tmp_path)
    assert parent.load("k1") is None  # index built now, before the worker writes
    locations = WorkCache(tmp_path).store_batch([("k1", _result(3), b"abc")])
    assert parent.load("k1") is None
    parent.add(locations)
    assert parent.member("k1", 0, 3) == b"abc"


def test_truncated_or_foreign_files_are_redone_not_trusted(tmp_path: Path) -> None:
    cache = WorkCache(tmp_path)
    cache.store_batch([("k1", {"a": 1}, b"x" * 100), ("k2", {"b": 2}, b"")])
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:-1])
    (tmp_path / "other.work").write_bytes(b"not an entry at all")
    (tmp_path / "half.tmp.123.work").write_bytes(b"")  # a killed writer's temporary
    fresh = WorkCache(tmp_path)
    assert fresh.cached_keys() == [] and fresh.load("k1") is None and fresh.load("k2") is None
    fresh.clean_temporaries()
    assert not (tmp_path / "half.tmp.123.work").exists()


def test_prune_drops_dead_batches_and_repacks_partly_live_ones(tmp_path: Path) -> None:
    cache = WorkCache(tmp_path)
    cache.store_batch([("dead1", _result(1), b"a"), ("dead2", _result(1), b"b")])
    cache.store_batch([("keep", _result(2, 1), b"xyz"), ("stale", _result(3), b"123")])
    cache.store_batch([("whole", _result(1), b"w")])
    (tmp_path / "old.json").write_text("{}")
    (tmp_path / "old.npy").write_bytes(b"")
    assert cache.prune({"keep", "whole"}) == 4  # dead1, dead2, stale, and the legacy .json entry
    assert len([p for p in tmp_path.iterdir()]) == 2 and not list(tmp_path.glob("old.*"))
    fresh = WorkCache(tmp_path)
    assert fresh.cached_keys() == ["keep", "whole"]
    assert fresh.load("keep") == _result(2, 1)
    assert fresh.member("keep", 0, 2) == b"xy" and fresh.member("keep", 2, 1) == b"z"
    assert cache.member("keep", 2, 1) == b"z"  # the pruning instance follows the repacked entry too
