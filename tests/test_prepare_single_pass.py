"""Prepare's single pass (headers and decoding from one parse) writes exactly what the two passes write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prepare_helpers import write_dicom
from test_prepare import pool_items, settings, shard_bytes

from modality.shards.build import build_shards, single_pass_datasets
from modality.shards.splits import LeakageError
from modality.shards.work import WorkCache


@pytest.fixture(scope="module")
def mixed_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Single-frame files (decoded in pass 1), multi-frame files (decoded after the caps), an excluded code,
    a broken file, a truncated one (headers read, pixels not) and a within-split copy: every path
    through pass 1."""
    root = tmp_path_factory.mktemp("mixed")
    split = {"site_a": "train", "site_b": "val"}
    seed = 0
    for dataset in split:
        for i in range(5):
            seed += 1
            write_dicom(
                root / dataset / f"im{i}.dcm",
                modality="CT" if i % 2 == 0 else "MR",
                patient_id=f"{dataset}-P{i // 2}",
                seed=seed,
                frames=8 if i == 4 else 1,
            )
    write_dicom(root / "site_a/us.dcm", modality="US", patient_id="site_a-P9", seed=99)
    write_dicom(root / "site_a/zcopy.dcm", patient_id="site_a-P0", seed=1)  # same pixels as im0
    (root / "site_a/broken.dcm").write_bytes(b"not a dicom file")
    whole = (root / "site_b/im0.dcm").read_bytes()
    (root / "site_b/truncated.dcm").write_bytes(whole[: len(whole) - 1000])  # inside the pixel data
    return root, split


def outputs(out_dir: Path) -> tuple[dict[str, bytes], bytes, dict]:
    summary = json.loads((out_dir / "summary.json").read_text())
    return shard_bytes(out_dir), (out_dir / "rejects.csv").read_bytes(), summary


def entries_with_headers(out_dir: Path) -> int:
    cache = WorkCache(out_dir / "work")
    return sum("headers" in (cache.load(key) or {}) for key in cache.cached_keys())


@pytest.mark.parametrize(
    "caps", [{"CT": 1000, "MR": 1000}, {"CT": 6, "MR": 1000}, {}], ids=["free", "capped", "uncapped"]
)
def test_single_pass_writes_the_same_bytes_as_two_passes(mixed_pool, tmp_path: Path, caps) -> None:
    root, split = mixed_pool
    items = pool_items(root, split)
    build_shards(items, settings(tmp_path / "one", split, caps=caps, workers=2))
    build_shards(items, settings(tmp_path / "two", split, caps=caps, single_pass=False))
    assert outputs(tmp_path / "one") == outputs(tmp_path / "two")
    assert entries_with_headers(tmp_path / "two") == 0
    if caps.get("CT") == 6:  # site_a's 8 files > the smallest cap: it keeps the header pass; site_b's 6 do
        # not, yet its 8-frame CT file makes the cap bind there too (11 CT slices): capped after pass 1.
        assert single_pass_datasets(items, caps) == {"site_b"}
        rejects = (tmp_path / "one/rejects.csv").read_text()
        assert "site_a,,over cap" in rejects and "site_b,,over cap" in rejects
    elif caps:  # the 9 single-frame CT/MR files and the truncated one; not the multi-frame, US or broken ones
        assert entries_with_headers(tmp_path / "one") == 10
    else:  # no class is capped: the two 8-frame files are decoded from their header parse too
        assert entries_with_headers(tmp_path / "one") == 12


def test_an_uncapped_runs_cache_serves_a_capped_rerun(mixed_pool, tmp_path: Path) -> None:
    """Pass 1 without caps cached the 8-frame CT file whole; a rerun in which a cap drops some of its
    frames must not take that entry, and writes what a fresh capped run writes."""
    root, split = mixed_pool
    items = pool_items(root, split)
    capped = {"CT": 6, "MR": 1000}
    build_shards(items, settings(tmp_path / "reused", split, caps={}))
    build_shards(items, settings(tmp_path / "reused", split, caps=capped))
    build_shards(items, settings(tmp_path / "fresh", split, caps=capped, single_pass=False))
    assert outputs(tmp_path / "reused") == outputs(tmp_path / "fresh")
    assert "over cap" in (tmp_path / "reused/rejects.csv").read_text()


def test_a_rerun_takes_headers_and_pixels_from_the_cache(mixed_pool, tmp_path: Path, monkeypatch) -> None:
    root, split = mixed_pool
    items = pool_items(root, split)
    build_shards(items, settings(tmp_path, split))
    first = outputs(tmp_path)
    import modality.readers as readers

    read_again: list[str] = []
    original = readers.read_headers_keeping_file

    def counting(item):
        read_again.append(Path(item.path).name)
        return original(item)

    monkeypatch.setattr(readers, "read_headers_keeping_file", counting)
    build_shards(items, settings(tmp_path, split))  # workers=0: the patched reader runs in this process
    assert outputs(tmp_path) == first
    # Only files pass 1 did not decode are read again: the excluded US file, the broken one and the
    # multi-frame ones (their pixels come from the decode pass's cache). The truncated file's decode
    # rejection was cached with its headers.
    assert sorted(read_again) == ["broken.dcm", "im4.dcm", "im4.dcm", "us.dcm"]
    assert entries_with_headers(tmp_path) == 10


def test_patient_guard_runs_before_anything_is_written_in_the_single_pass(tmp_path: Path) -> None:
    write_dicom(tmp_path / "data/site_a/x.dcm", patient_id="SHARED-7", seed=1)
    write_dicom(tmp_path / "data/site_b/y.dcm", patient_id="SHARED-7", seed=2)
    split = {"site_a": "train", "site_b": "test"}
    with pytest.raises(LeakageError, match="SHARED-7"):
        build_shards(pool_items(tmp_path / "data", split), settings(tmp_path / "out", split))
    assert entries_with_headers(tmp_path / "out") == 2  # decoded in pass 1 ...
    assert not (tmp_path / "out/shards").exists()  # ... but nothing written


def test_big_files_are_read_deferred_with_the_same_output(mixed_pool, tmp_path: Path, monkeypatch) -> None:
    import modality.readers.dicom as dicom_reader

    root, split = mixed_pool
    items = pool_items(root, split)
    build_shards(items, settings(tmp_path / "whole", split))
    monkeypatch.setattr(dicom_reader, "FULL_READ_MAX_BYTES", 0)  # every file "big": deferred pixel data
    build_shards(items, settings(tmp_path / "deferred", split))
    assert outputs(tmp_path / "whole") == outputs(tmp_path / "deferred")


def test_cache_batch_size_changes_nothing_written(mixed_pool, tmp_path: Path, monkeypatch) -> None:
    """Batches that close after every entry (BATCH_MAX_PAYLOAD 1 byte) or hold a pool hand-off each: the
    shards, rejects and summary are the same, and a rerun finds every entry whatever file it is in."""
    import modality.shards.work as work

    root, split = mixed_pool
    items = pool_items(root, split)
    build_shards(items, settings(tmp_path / "batched", split, single_pass=False))
    monkeypatch.setattr(work, "BATCH_MAX_PAYLOAD", 1)
    build_shards(items, settings(tmp_path / "single", split, single_pass=False))
    assert outputs(tmp_path / "batched") == outputs(tmp_path / "single")
    entries = WorkCache(tmp_path / "single/work").cached_keys()
    assert len(list((tmp_path / "single/work").glob("*.work"))) == len(entries)  # one file per entry
    assert len(list((tmp_path / "batched/work").glob("*.work"))) < len(entries)
    assert WorkCache(tmp_path / "batched/work").cached_keys() == entries
