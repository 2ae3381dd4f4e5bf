"""Prepare over the shared real corpus (29 public repositories, broken and odd files on purpose).

One module-scoped run of ``dataset=real_shared`` (64x64 slices: decoding dominates, and the assertions are
about accounting, not pixels) feeds every test here.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from modality.paths import CONFIG_DIR, shared_data_root
from modality.prepare import is_prepared, prepare
from modality.sources.manifest import current_rows

ROOT = shared_data_root()
pytestmark = pytest.mark.skipif(not (ROOT / "manifest.csv").is_file(), reason=f"shared corpus not at {ROOT}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("real_shared")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "prepare",
            overrides=["dataset=real_shared", f"out_dir={out_dir}", "image_size=64", "progress=false"],
        )
    prepare(cfg)
    return out_dir


@pytest.fixture(scope="module")
def summary(prepared: Path) -> dict:
    return json.loads((prepared / "summary.json").read_text())


@pytest.fixture(scope="module")
def rejects(prepared: Path) -> list[dict[str, str]]:
    with (prepared / "rejects.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def samples(prepared: Path) -> list[tuple[str, dict, bytes, bytes]]:
    """(shard name, metadata, cls bytes, png bytes) for every sample in every shard."""
    out = []
    for shard in sorted((prepared / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        out += [(shard.name, json.loads(m["json"]), m["cls"], m["png"]) for m in members.values()]
    return out


def test_every_file_is_written_or_rejected_with_a_reason(summary, rejects, samples) -> None:
    with (ROOT / "manifest.csv").open(newline="") as handle:
        manifest_rows = list(csv.DictReader(handle))
    on_disk = {str(ROOT / row["path"]) for row in current_rows(manifest_rows)}
    written = {meta["source_path"] for _, meta, _, _ in samples}
    rejected = {row["path"] for row in rejects}
    assert all(row["reason"].strip() for row in rejects)
    assert on_disk <= written | rejected
    assert written <= on_disk and rejected <= on_disk
    inputs = summary["inputs"]
    assert inputs["files"] == len(on_disk) == len(manifest_rows) - 15  # 15 rows describe older git versions
    assert inputs["written_files"] + inputs["rejected_files"] == inputs["files"]
    assert inputs["written_files"] == len(written)
    assert inputs["slices_written"] == len(samples)


def test_zero_crashes(rejects) -> None:
    crashes = [row for row in rejects if row["reason"].startswith("unexpected error")]
    assert crashes == [], crashes[:5]


def test_counts_add_up(summary, samples) -> None:
    for split, entry in summary["splits"].items():
        mine = [meta for shard, meta, _, _ in samples if shard.startswith(split + "-")]
        assert entry["samples"] == len(mine) == sum(s["samples"] for s in entry["shards"])
        assert sum(entry["by_class"].values()) == entry["samples"]
        assert sum(n for per in entry["by_dataset"].values() for n in per.values()) == entry["samples"]
        assert all(summary["split_map"][meta["dataset"]] == split for meta in mine)
    for _, meta, cls, _ in samples:
        assert summary["classes"][int(cls)] == meta["class"]


def test_split_has_every_class_in_train_and_unseen_sources_elsewhere(summary) -> None:
    splits = summary["splits"]
    assert set(splits["train"]["by_class"]) == {"CT", "MR", "PT", "XR"}
    for split in ("val", "test"):
        assert {"CT", "MR", "XR"} <= set(splits[split]["by_class"])
        assert not set(splits[split]["by_dataset"]) & set(splits["train"]["by_dataset"])


def test_train_stats_equal_numpy_on_stored_pixels(summary, samples) -> None:
    pixels = np.concatenate(
        [
            np.asarray(Image.open(io.BytesIO(png))).ravel()
            for shard, _, _, png in samples
            if shard.startswith("train")
        ]
    ).astype(np.float64)
    stats = summary["stats"]["train"]
    assert stats["pixels"] == pixels.size
    assert stats["mean"] == pytest.approx(pixels.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(pixels.std(), rel=1e-12)


def test_shards_read_by_tar_and_webdataset(prepared: Path, summary) -> None:
    import webdataset as wds

    shard = prepared / "shards" / summary["splits"]["val"]["shards"][0]["name"]
    listing = subprocess.run(
        ["tar", "-tf", str(shard)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(listing) == 3 * summary["splits"]["val"]["shards"][0]["samples"]
    decoded = list(wds.WebDataset(str(shard), shardshuffle=False).decode("l8"))
    assert len(decoded) == summary["splits"]["val"]["shards"][0]["samples"]
    assert all(s["png"].shape == (64, 64) and s["png"].dtype == np.uint8 for s in decoded)


def test_outputs_complete(prepared: Path) -> None:
    assert is_prepared(prepared)
    assert {p.name for p in (prepared / "charts").iterdir()} == {"train.png", "val.png", "test.png"}
    assert not list((prepared / "shards").glob("*.partial"))


def test_every_source_and_analyze_pet_volume_is_read(summary, samples) -> None:
    """The corpus grew to 29 sources (Toshiba/Philips MR, Lung-PET-CT-Dx CT, Analyze brain PET): all are read."""
    datasets = {meta["dataset"] for _, meta, _, _ in samples}
    for name in (
        "neurolabusc+dcm_qa_toshiba",
        "neurolabusc+dcm_qa_philips",
        "huyenbui117+lung_CT",
        "cego669+PCA-and-LR-as-a-diagnostic-tool-for-AD",
    ):
        assert name in datasets
        assert name in summary["split_map"]
    pet = [(meta, png) for _, meta, _, png in samples if meta["dataset"].startswith("cego669+")]
    # Every one of the 18 .img/.hdr pairs yields axial slices (79 per volume; blank ones are rejected).
    assert {meta["source_path"].rsplit("/", 1)[-1] for meta, _ in pet} == {
        Path(row["path"]).name
        for row in csv.DictReader((ROOT / "manifest.csv").open(newline=""))
        if row["kind"] == "volume"
    }
    assert len(pet) > 18 * 40
    assert all(meta["class"] == "PT" and meta["original_shape"] == [95, 79] for meta, _ in pet)
    # scl_slope applied: activity values are non-integer, as PET after its rescale is.
    assert np.median([meta["value_features"][8] for meta, _ in pet]) > 0.5


def test_shards_prepared_with_another_preprocessing_are_refused_not_reused(tmp_path: Path) -> None:
    out_dir = tmp_path / "prepared"
    base = [
        "dataset=real_shared",
        "+dataset.sources.0.datasets=[neurolabusc+dcm_qa_toshiba]",
        f"out_dir={out_dir}",
        "image_size=32",
        "progress=false",
        "charts=false",
        "workers=0",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        first = compose("prepare", overrides=[*base, "scaling=percentile"])
        again = compose("prepare", overrides=[*base, "scaling=percentile", "skip_if_prepared=true"])
        other = compose("prepare", overrides=[*base, "scaling=minmax", "skip_if_prepared=true"])
    prepare(first)
    stamp = (out_dir / "summary.json").stat().st_mtime_ns
    prepare(again)  # same request: reused
    assert (out_dir / "summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"another preprocessing.*scaling"):
        prepare(other)
    assert (out_dir / "summary.json").stat().st_mtime_ns == stamp


def test_four_parts_and_a_merge_equal_the_single_run(prepared: Path, tmp_path: Path) -> None:
    """Issue 18's acceptance on the real corpus: 4 parts + merge write the single run's bytes (shards,
    summary with its statistics, rejects), every vendor, syntax, volume and broken file included."""
    from modality.shards.parts import PARTS_DIR, read_record

    out_dir = tmp_path / "parts"
    common = ["dataset=real_shared", f"out_dir={out_dir}", "image_size=64", "progress=false", "parts=4"]
    for part in range(4):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            prepare(compose("prepare", overrides=[*common, f"part={part}"]))
    folders = sorted(p for p in (out_dir / PARTS_DIR).iterdir() if p.is_dir())
    files = [read_record(folder)[0]["files"] for folder in folders]
    assert len(files) == 4 and max(files) - min(files) <= 0.1 * max(files)  # balanced
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        prepare(compose("prepare", overrides=[*common, "merge=true"]))
    for name in ["summary.json", "rejects.csv", *sorted(p.name for p in (prepared / "shards").iterdir())]:
        where = "shards/" if name.endswith(".tar") else ""
        assert (out_dir / where / name).read_bytes() == (prepared / where / name).read_bytes(), name
